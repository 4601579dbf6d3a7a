"""Checkpoint loading: Cadene's module, md5 check, 1001/1000 outputs, label mapping."""
import numpy as np
import pytest
import torch

from nasq.errors import CheckpointError
from nasq.inference.evaluate import topk
from nasq.model.checkpoint import build_model, load_model
from nasq.model.spec import SEED_CHECKPOINT_NAME


def test_module_is_cadenes():
    from pretrainedmodels.models.nasnet import NASNetALarge

    m = build_model("large")
    assert type(m) is NASNetALarge
    n = sum(p.numel() for p in m.parameters())
    assert n == 88_757_183  # trainable parameters with the 1001-way head (BatchNorm buffers not counted)


def test_load_matches_direct_cadene_load(assets):
    from pretrainedmodels.models.nasnet import NASNetALarge

    state = torch.load(assets["weights"], weights_only=True)
    ref = NASNetALarge(num_classes=1001, stem_filters=16, penultimate_filters=192).eval()
    ref.load_state_dict(state)
    model, info = load_model(assets["weights"])
    assert info.arch == "tiny" and info.num_outputs == 1001 and info.checkpoint_outputs == 1001
    x = torch.randn(2, 3, 331, 331)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


def test_1000_outputs_drop_background(assets, tmp_path):
    m1001, _ = load_model(assets["weights"])
    m1000, info = load_model(assets["weights"], num_outputs=1000)
    assert info.num_outputs == 1000
    x = torch.randn(2, 3, 331, 331)
    with torch.inference_mode():
        a, b = m1001(x), m1000(x)
    assert torch.allclose(a[:, 1:], b, atol=1e-5)
    ids1001, _ = topk(a.numpy(), 1001)
    ids1000, _ = topk(b.numpy(), 1000)
    assert np.array_equal(ids1001, ids1000)
    # and a checkpoint saved with 1000 outputs loads as such
    sd = torch.load(assets["weights"], weights_only=True)
    sd["last_linear.weight"], sd["last_linear.bias"] = sd["last_linear.weight"][1:], sd["last_linear.bias"][1:]
    torch.save(sd, tmp_path / "k1000.pth")
    m, info = load_model(tmp_path / "k1000.pth")
    assert info.checkpoint_outputs == 1000 and info.num_outputs == 1000
    with pytest.raises(CheckpointError, match="cannot make 1001"):
        load_model(tmp_path / "k1000.pth", num_outputs=1001)


def test_topk_label_mapping():
    logits = np.zeros((1, 1001), dtype=np.float32)
    logits[0, 66] = 5  # output 66 = ImageNet label 65 with a background class at 0
    logits[0, 0] = 4   # background
    ids, scores = topk(logits, 1001)
    assert ids[0, 0] == 65 and ids[0, 1] == -1 and scores[0, 0] == 5
    ids, _ = topk(logits[:, 1:], 1000)
    assert ids[0, 0] == 65


def test_seed_name_md5_mismatch_refused(tmp_path, assets):
    bad = tmp_path / SEED_CHECKPOINT_NAME
    bad.write_bytes(open(assets["weights"], "rb").read())
    with pytest.raises(CheckpointError, match="md5 is .* but the published checkpoint"):
        load_model(bad)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a NASNet-A Large state dict"):
        load_model(tmp_path / "other.pth")


def test_topk_order_is_a_stable_sorts_on_ties_nans_and_infinities():
    """The partial selection returns exactly what a stable sort of every logit would: ties
    (broken by the lower id), ties straddling the k-th place, NaNs, infinities, rows narrower than k."""
    from nasq.inference.evaluate import _top_order

    rng = np.random.default_rng(0)
    for case in range(1500):
        n, width = int(rng.integers(1, 40)), int(rng.choice([1, 3, 5, 6, 1000, 1001]))
        kind = case % 4
        if kind == 0:
            logits = rng.standard_normal((n, width)).astype(np.float32)
        elif kind == 1:  # many ties, some across the k-th place
            logits = rng.integers(0, 3, (n, width)).astype(np.float32)
        elif kind == 2:
            logits = rng.standard_normal((n, width)).astype(np.float32)
            logits[rng.random((n, width)) < 0.3] = np.nan
        else:
            logits = rng.standard_normal((n, width))
            logits[rng.random((n, width)) < 0.1] = np.inf
            logits[rng.random((n, width)) < 0.1] = -np.inf
        for k in (1, 5):
            assert np.array_equal(_top_order(logits, k), np.argsort(-logits, axis=1, kind="stable")[:, :k]), (case, k)
    for logits in (np.array([[0, 5, 5]], np.uint8), np.array([[np.iinfo(np.int32).min, 5, 5]], np.int32),
                   np.zeros((0, 10), np.float32)):
        for k in (0, 2):
            assert np.array_equal(_top_order(logits, k), np.argsort(-logits, axis=1, kind="stable")[:, :k])
