"""Trust boundaries as pure logic: roots, payload bounds, build specs, checkpoints, labels,
atomic writes on a full disk, device pinning under an inherited CUDA_VISIBLE_DEVICES."""
import errno
import os

import pytest

from nasq.errors import CheckpointError, DatasetError, NasqError
from nasq.wire import MAX_BATCH_SIZE, MessageError, ShardTask, SweepPoint
from nasq.roots import RootError, Roots


def test_roots_resolve_links_and_do_not_match_prefixes(tmp_path):
    data, other, out = tmp_path / "data", tmp_path / "data2", tmp_path / "out"
    for d in (data, other, out):
        d.mkdir()
    (other / "secret.txt").write_text("TOPSECRET\n")
    (data / "labels.txt").symlink_to(other / "secret.txt")  # a link inside a root to a file outside it
    (data / "up").symlink_to(tmp_path)
    roots = Roots.of(read=[str(data)], write=[str(out)])
    assert roots.readable(str(data / "x.JPEG"), "image") == str(data / "x.JPEG")
    assert roots.readable(str(out / "r.json"), "report") == str(out / "r.json")  # a write root is readable
    for bad in (other / "secret.txt", data / "labels.txt", data / "up" / "data2", data / ".." / "data2", "/etc/shadow"):
        with pytest.raises(RootError, match="outside this worker's read roots") as e:
            roots.readable(str(bad), "label file")
        assert "TOPSECRET" not in str(e.value) and str(data) in str(e.value)
    with pytest.raises(RootError, match="write roots"):
        roots.writable(str(data / "out"), "output folder")
    for bad in ("relative/path", "", "/data\0/x"):
        with pytest.raises(RootError, match="absolute"):
            roots.readable(bad, "data folder")


def _shard(**change):
    job = {"dataset": {"root": "/data/val", "kind": "jpeg", "images": 100, "fingerprint": "f" * 16},
           "labels": "/data/val_label.txt", "model": {"weights": "/models/n.pth", "num_outputs": None, "options": {}},
           "backend": "torch", "batch_size": 4, "precision": None, "output": None}
    args = {"run_id": "r", "shard_id": "s", "start": 0, "stop": 8}
    for k, v in change.items():
        if k in args:
            args[k] = v
        elif k.startswith("dataset."):
            job["dataset"][k.split(".", 1)[1]] = v
        else:
            job[k] = v
    return ShardTask.from_payload(job=job, **args)


@pytest.mark.parametrize("change, field", [
    ({"start": -1}, "start"), ({"stop": 10**12}, "stop"), ({"dataset.images": 10**12}, "images"),
    ({"dataset.images": 0}, "images"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": MAX_BATCH_SIZE + 1}, "batch_size"), ({"start": 0, "stop": 100, "dataset.images": 200_000}, None),
    ({"labels": "x" * 10_000}, "labels"), ({"model": {"weights": "/m.pth", "options": "rm -rf"}}, "options"),
])
def test_payload_bounds_are_checked_before_any_work(change, field):
    if field is None:  # within the bounds: accepted
        assert _shard(**change).stop == 100
        return
    with pytest.raises(MessageError, match=field):
        _shard(**change)


def test_a_shard_larger_than_the_bound_is_refused():
    with pytest.raises(MessageError, match="at most"):
        _shard(start=0, stop=200_000, **{"dataset.images": 1_000_000})


def test_job_within_roots_resolves_every_path(tmp_path):
    (tmp_path / "val").mkdir()
    task = _shard(**{"dataset.root": str(tmp_path / "val"), "labels": str(tmp_path / "l.txt"),
                     "model": {"weights": str(tmp_path / "m.pth")},
                     "output": {"dir": str(tmp_path / "out"), "fmt": "NPY"}})
    roots = Roots.of(read=[str(tmp_path)], write=[str(tmp_path / "out")])
    job = task.job.within(roots)
    assert job.dataset.root == str(tmp_path / "val") and job.output.dir == str(tmp_path / "out")
    for change, what in (({"output": {"dir": "/", "fmt": "NPY"}}, "output folder"), ({"labels": "/etc/shadow"}, "label"),
                         ({"dataset.root": "/etc"}, "data folder"), ({"model": {"weights": "/etc/passwd"}}, "weights")):
        base = {"dataset.root": str(tmp_path / "val"), "labels": str(tmp_path / "l.txt"),
                "model": {"weights": str(tmp_path / "m.pth")}} | change
        with pytest.raises(RootError, match=what):
            _shard(**base).job.within(roots)


def test_sweep_point_folder_must_be_a_write_root(tmp_path):
    point = SweepPoint.from_payload({"sweep_id": "s", "point_id": "w|bs1", "folder": "/etc/nasq", "worker": "w",
                                     "batch_size": 1, "mode": "bench", "backend": "torch", "precision": "fp32",
                                     "weights": str(tmp_path / "m.pth"), "data": str(tmp_path),
                                     "dataset_fingerprint": "x"})
    with pytest.raises(RootError, match="sweep folder"):
        point.within(Roots.of(read=[str(tmp_path)], write=[str(tmp_path / "rep")]))


def test_build_specs_from_messages_are_checked(tmp_path):
    from nasq.artifacts.pipeline import _staging
    from nasq.artifacts.spec import BuildSpec
    from nasq.artifacts.store import ArtifactStore

    good = {"weights": "/m.pth", "weights_sha256": "ab" * 32, "target": "onnx", "token": "0123456789ab"}
    spec = BuildSpec.from_dict(good)
    for bad in ({"target": "../../etc"}, {"token": "../x"}, {"weights": "relative.pth"}, {"evil": 1},
                {"onnx_key": "../onnx-1"}, {"gears": [1, -4]}, {"soc_version": "x; rm -rf /"}):
        with pytest.raises(NasqError, match="build spec"):
            BuildSpec.from_dict(good | bad)
    art = ArtifactStore(str(tmp_path))
    state = {"spec": spec.to_dict(), "staging": art.staging_path(spec.key, spec.token)}
    assert _staging(state, spec, art) == art.staging_path(spec.key, spec.token)
    with pytest.raises(NasqError, match="another staging"):
        _staging(state | {"staging": "/etc"}, spec, art)
    with pytest.raises(RootError):
        spec.within(Roots.of(read=[str(tmp_path)]))


def test_index_datasets_are_lazy_and_bounded():
    from nasq.data.sources import MAX_INDEX_IMAGES, open_source

    src = open_source(f"index:{MAX_INDEX_IMAGES}")
    assert len(src) == MAX_INDEX_IMAGES and src.names[5] == "00000005" and src.names[-1] == f"{MAX_INDEX_IMAGES - 1:08d}"
    with pytest.raises(DatasetError, match="index:N"):
        open_source(f"index:{MAX_INDEX_IMAGES + 1}")


def test_label_errors_name_the_line_never_its_content(tmp_path):
    from nasq.data.labels import out_of_range, read_labels

    f = tmp_path / "shadow"
    f.write_text("admin:$6$TOPSECRET:19000:0:99999:7:::\n")
    with pytest.raises(DatasetError) as e:
        read_labels(str(f))
    assert f"{f}:1" in str(e.value) and "TOPSECRET" not in str(e.value) and "admin" not in str(e.value)
    assert out_of_range({"a": 5000, "b": -1, "c": 3}, ["a.JPEG", "b.JPEG", "c.JPEG", "d.JPEG"]) == [("a.JPEG", 5000),
                                                                                                  ("b.JPEG", -1)]


def _tiny_state():
    from nasq.model.checkpoint import build_model

    return build_model("tiny").state_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"last_linear.weight": s["last_linear.weight"][:10], "last_linear.bias": s["last_linear.bias"][:10]}),
     "10 outputs"),
    (lambda s: s.pop("cell_0.conv_1x1.conv.weight"), "1 missing"),
    (lambda s: s.update({"cell_0.conv_1x1.conv.weight": s["cell_0.conv_1x1.conv.weight"][:, :3]}), "wrong shape"),
    (lambda s: s.update({"extra.weight": s["last_linear.bias"]}), "1 unexpected"),
])
def test_the_whole_checkpoint_is_checked_before_queueing(edit, message):
    from nasq.model.checkpoint import check_state_dict

    state = _tiny_state()
    assert check_state_dict(state, "t.pth").name == "tiny"
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        check_state_dict(state, "t.pth")


def test_a_hostile_or_corrupt_checkpoint_gets_no_advice_to_unpickle(tmp_path):
    import pickle

    from nasq.model.checkpoint import read_checkpoint

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(pickle.dumps({"w": Evil()}))
    import torch

    torch.save({"w": Evil()}, tmp_path / "hostile2.pth")
    (tmp_path / "corrupt.pth").write_bytes(os.urandom(4096))
    for name, why in (("hostile2.pth", "Python objects besides tensors"), ("corrupt.pth", "corrupt"),
                      ("hostile.pth", "corrupt|Python objects")):
        with pytest.raises(CheckpointError, match=why) as e:
            read_checkpoint(str(tmp_path / name))
        assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_a_folder_without_a_usable_image_is_refused(tmp_path, assets):
    from nasq.data.sources import check_usable, open_source

    (tmp_path / "a.JPEG").write_text("not an image")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable image"):
        check_usable(open_source(str(tmp_path)))
    check_usable(open_source(assets["data"]))  # has unusable files too, but usable ones


def test_atomic_write_leaves_nothing_behind_on_enospc(tmp_path):
    from nasq.files import atomic_write, write_json

    target = tmp_path / "report.json"
    target.write_text("old")

    def fill(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        atomic_write(target, fill)
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["report.json"] and target.read_text() == "old"
    with pytest.raises(TypeError):  # a failure while serializing: the same clean-up
        write_json({"x": object()}, tmp_path / "other.json")
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_pinning_honours_an_inherited_visibility_list():
    from workers.pinning import pinning_env

    assert pinning_env("cuda:0", environ={"CUDA_VISIBLE_DEVICES": "2,3"}) == ({"CUDA_VISIBLE_DEVICES": "2"}, "cuda:0")
    assert pinning_env("cuda:1", environ={"CUDA_VISIBLE_DEVICES": "2,3"})[0] == {"CUDA_VISIBLE_DEVICES": "3"}
    uuid = "GPU-5f1c0f2e-0000-0000-0000-000000000001"
    assert pinning_env("cuda:0", environ={"CUDA_VISIBLE_DEVICES": uuid})[0] == {"CUDA_VISIBLE_DEVICES": uuid}
    assert pinning_env("npu:1", environ={"ASCEND_RT_VISIBLE_DEVICES": "4,5,6"})[0] == {"ASCEND_RT_VISIBLE_DEVICES": "5"}
    assert pinning_env("cuda:3", environ={})[0] == {"CUDA_VISIBLE_DEVICES": "3"}
    with pytest.raises(ValueError, match="may see only 2"):
        pinning_env("cuda:2", environ={"CUDA_VISIBLE_DEVICES": "2,3"})


@pytest.mark.parametrize("run_id", ["../../etc", "/etc/x", "", "a/b", "..", "x" * 200, 7])
def test_ids_that_become_file_names_are_plain_names(run_id):
    with pytest.raises(MessageError, match="run_id"):
        _shard(run_id=run_id)


def test_the_merge_writes_only_under_its_own_run_folder(tmp_path):
    """A manifest planted in Redis with a path for a run id is refused before any file is written."""
    from nasq.errors import RunError
    from nasq.results.ending import finish_run

    from dataclasses import replace

    from plans import run_manifest

    with pytest.raises(MessageError, match="run_id"):  # what a store reads is refused as it is read
        run_manifest("/tmp/elsewhere")

    class Store:
        runs = property(lambda self: self)

        def manifest(self, run_id):  # and a manifest of another run is refused by the merge
            return replace(run_manifest("r1"), run_id="/tmp/elsewhere")

    with pytest.raises(RunError, match="another run"):
        finish_run("r1", [], store=Store(), report_dir=str(tmp_path), merge_wait_s=1, first_try=0)
    assert os.listdir(tmp_path) == []


def test_u8_index_may_not_name_files_outside_its_folder(tmp_path):
    import json

    from nasq.data.sources import U8_FORMAT, open_source

    (tmp_path / "index.json").write_text(json.dumps({"format": U8_FORMAT, "names": ["a"],
                                                     "shards": [{"file": "../secret.npy", "start": 0}]}))
    with pytest.raises(DatasetError, match="not a readable nasq u8 index"):
        open_source(str(tmp_path))


def test_per_batch_size_caches_are_bounded():
    from nasq.backends.torch_backend import _bounded

    cache = {}
    for bs in range(1, 100):
        _bounded(cache)
        cache[bs] = bs
    assert list(cache) == [96, 97, 98, 99]


def test_build_spec_tolerance_fields_are_checked():
    from nasq.artifacts.spec import BuildSpec

    good = {"weights": "/m.pth", "weights_sha256": "ab" * 32, "target": "onnx", "token": "0123456789ab"}
    for bad in ({"accept_tolerance": "yes"}, {"tolerance": 1e9}, {"tolerance": -1}):
        with pytest.raises(NasqError, match="build spec"):
            BuildSpec.from_dict(good | bad)
