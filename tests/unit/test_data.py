"""Dataset forms, bad images, labels and preprocessing to .bin / u8."""
import json
import os

import numpy as np
import pytest

from nasq.data import ImageError, open_source, preprocess_float, preprocess_u8, read_labels
from nasq.errors import DatasetError
from nasq.data.preprocess import preprocess


def test_bad_images_raise_with_reason(assets):
    val = assets["data"]
    with pytest.raises(ImageError, match="truncated"):
        preprocess_u8(os.path.join(val, "ILSVRC2012_val_00000021.JPEG"))
    with pytest.raises(ImageError, match="cannot identify"):
        preprocess_u8(os.path.join(val, "ILSVRC2012_val_00000022.JPEG"))
    with pytest.raises(ImageError, match="empty file"):
        preprocess_u8(os.path.join(val, "ILSVRC2012_val_00000023.JPEG"))


def test_jpeg_source_lists_images_only(assets, tmp_path):
    src = open_source(assets["data"])
    assert src.kind == "jpeg" and len(src) == 23
    assert src.names == sorted(src.names)
    assert src.load(0).shape == (331, 331, 3)


def test_labels_parse_and_errors(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("ILSVRC2012_val_00000001.JPEG 65\n\nILSVRC2012_val_00000002.JPEG 0\n")
    assert read_labels(p) == {"ILSVRC2012_val_00000001": 65, "ILSVRC2012_val_00000002": 0}
    p.write_text("ILSVRC2012_val_00000001.JPEG sixty-five\n")
    with pytest.raises(DatasetError, match=r"l.txt:1"):
        read_labels(p)
    with pytest.raises(DatasetError, match="does not exist"):
        read_labels(tmp_path / "missing.txt")


def test_preprocess_u8_resumable_and_equal(assets, tmp_path):
    dst = tmp_path / "u8"
    res = preprocess(assets["data"], str(dst), fmt="u8", workers=2, shard_size=8, progress=False)
    assert res.images == 23 and res.written == 23 and len(res.errors) == 3
    src = open_source(str(dst))
    assert src.kind == "u8" and src.dtype == "uint8" and len(src) == 23
    jpeg = open_source(assets["data"])
    for i in (0, 7, 8, 19):
        assert np.array_equal(src.load(i), jpeg.load(i))
    bad = [i for i, n in enumerate(src.names) if n in assets["bad"]]
    for i in bad:
        with pytest.raises(ImageError):
            src.load(i)
    # An interrupted run: one shard and the index gone. The rerun redoes only that shard.
    os.remove(dst / "shard-00001.npy")
    os.remove(dst / "index.json")
    res2 = preprocess(assets["data"], str(dst), fmt="u8", workers=2, shard_size=8, progress=False)
    assert res2.written == 8 and res2.skipped == 15
    assert json.loads((dst / "index.json").read_text())["images"] == 23


def test_incomplete_u8_is_refused(assets, tmp_path):
    dst = tmp_path / "u8"
    preprocess(assets["data"], str(dst), fmt="u8", workers=1, shard_size=8, progress=False)
    os.remove(dst / "index.json")
    with pytest.raises(DatasetError, match="did not finish"):
        open_source(str(dst))


def test_preprocess_bin_layout(assets, tmp_path):
    dst = tmp_path / "bin"
    res = preprocess(assets["data"], str(dst), fmt="bin", workers=2, progress=False)
    assert res.written == 20 and len(res.errors) == 3
    f = dst / "ILSVRC2012_val_00000001.bin"
    assert f.stat().st_size == 3 * 331 * 331 * 4
    x = np.fromfile(f, dtype=np.float32).reshape(3, 331, 331)
    assert np.array_equal(x, preprocess_float(os.path.join(assets["data"], "ILSVRC2012_val_00000001.JPEG")))
    src = open_source(str(dst))
    assert src.kind == "bin" and len(src) == 23  # the three failures are listed, with their reasons
    assert sum(1 for i in range(len(src)) if i in src.known_errors) == 3
    again = preprocess(assets["data"], str(dst), fmt="bin", workers=2, progress=False)
    assert again.written == 0  # resumable: nothing redone


def test_prefetching_loader_threads_give_identical_results(assets):
    from nasq import backends
    from nasq.data import read_labels
    from nasq.inference.evaluate import evaluate_range
    from nasq.model.spec import ModelRef

    b = backends.create("torch", "cpu")
    b.load(ModelRef(assets["weights"]), batch_size=4)
    src, labels = open_source(assets["data"]), read_labels(assets["labels"])
    one = evaluate_range(src, b, 0, len(src), batch_size=4, labels=labels)
    many = evaluate_range(src, b, 0, len(src), batch_size=4, labels=labels, loader_threads=3)
    for key in ("indices", "names", "labels", "top5", "scores", "errors"):
        assert one[key] == many[key], key
    assert len(one["errors"]) == 3
