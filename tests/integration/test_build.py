"""Model builds on the build queue, with real build workers."""
import os
import stat
import threading
import uuid

import numpy as np
import pytest

from nasq.api import build, evaluate, evaluate_local
from nasq.artifacts.spec import make_spec
from nasq.artifacts.steps import graph_facts
from nasq.config import Settings
from nasq.queue.store import RunStore
from nasq.errors import NasqError

pytestmark = pytest.mark.slow  # model builds / a broker restarted: minutes


def _settings(build_env):
    return Settings(broker_url=build_env["url"], artifact_dir=build_env["artifact_dir"])


def test_ort_build_verified_then_cache_hit(assets, build_env):
    s = _settings(build_env)
    res = build(weights=assets["weights"], target="ort", settings=s, log=lambda *_: None)
    rows = {r["step"]: r for r in res.meta["verification"]}
    assert set(rows) == {"export", "simplify", "ort-cpu"}
    for r in rows.values():
        assert r["ok"] and r["top1_agreement"] == 1.0 and r["max_rel"] <= 1e-4 and r["images"] == 8
    assert res.meta["graph"]["consecutive_slice_pairs"] == 0
    assert os.path.isfile(os.path.join(res.path, "model.cpu.onnx"))
    assert set(res.meta["files"]) == {"model.cpu.onnx"} and res.meta["versions"]["onnxruntime"]
    onnx = build(weights=assets["weights"], target="onnx", settings=s, log=lambda *_: None)
    assert onnx.cached and os.path.isfile(os.path.join(onnx.path, "model.onnx"))
    again = build(weights=assets["weights"], target="ort", settings=s, log=lambda *_: None)
    assert again.cached and again.path == res.path and again.meta == res.meta
    assert "verification against PyTorch fp32" in again.table and "cache hit" in again.table


def test_concurrent_builds_of_one_key_export_once(assets, build_env, tmp_path):
    # a fresh key: same weights content under another opset
    s = _settings(build_env)
    key = make_spec(weights=assets["weights"], target="onnx", opset=16, cache_dir=s.artifact_dir).key
    exports = f"build {key}: export"  # what a build worker logs when it starts an export
    before = build_env["workers"].log_text().count(exports)
    results, errors = [], []

    def one():
        try:
            results.append(build(weights=assets["weights"], target="onnx", opset=16, settings=s, log=lambda *_: None))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len({r.path for r in results}) == 1
    assert sorted(r.cached for r in results) == [False, True]  # one built, the other waited and reused it
    assert results[0].key == key
    assert build_env["workers"].log_text().count(exports) - before == 1
    assert not os.listdir(os.path.join(build_env["artifact_dir"], ".staging"))


def test_failed_verification_leaves_nothing(assets, build_env):
    s = _settings(build_env)
    with pytest.raises(NasqError, match="--accept-tolerance"):
        build(weights=assets["weights"], target="onnx", opset=15, tolerance=1e-12, settings=s, log=lambda *_: None)
    spec = make_spec(weights=assets["weights"], target="onnx", opset=15, cache_dir=s.artifact_dir)
    assert not os.path.exists(os.path.join(s.artifact_dir, spec.key))
    assert not os.listdir(os.path.join(s.artifact_dir, ".staging"))
    assert RunStore(build_env["url"]).builds.build_lock(spec.key, "anyone").holder() is None
    kept = build(weights=assets["weights"], target="onnx", opset=15, tolerance=1e-12, accept_tolerance=True,
                 settings=s, log=lambda *_: None)
    assert not kept.cached and not all(r["ok"] for r in kept.meta["verification"])


def test_om_without_atc_prints_the_command(assets, build_env):
    s = _settings(build_env)
    with pytest.raises(NasqError) as e:
        build(weights=assets["weights"], target="om", soc_version="310P3", settings=s, log=lambda *_: None)
    onnx = make_spec(weights=assets["weights"], target="om", soc_version="310P3", cache_dir=s.artifact_dir).onnx_key
    model = os.path.join(s.artifact_dir, onnx, "model.onnx")
    assert (f"atc --framework=5 --model={model} --input_format=NCHW --input_shape=image:1,3,331,331 "
            "--output=nasnetlarge_bs1 --log=error --soc_version=Ascend310P3") in str(e.value)
    assert os.path.isfile(model)  # the ONNX the command needs is built and kept
    assert not os.listdir(os.path.join(s.artifact_dir, ".staging"))


STUB_ATC = """#!/bin/sh
echo "$@" >> "$NASQ_TEST_ATC_LOG"
for a in "$@"; do case "$a" in --output=*) out="${a#--output=}";; esac; done
echo fake-om > "$out.om"
"""


def test_om_with_stub_atc_uses_the_seeds_flags(assets, other_db, start_workers, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    atc = bindir / "atc"
    atc.write_text(STUB_ATC)
    atc.chmod(atc.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "atc.log"
    url = other_db(13)
    art = str(tmp_path / "art")
    w = start_workers(url, "build", settings=Settings(artifact_dir=art),
                      env={"NASQ_TEST_ATC_LOG": str(log), "PATH": f"{bindir}:{os.environ['PATH']}"})
    try:
        s = Settings(broker_url=url, artifact_dir=art)
        res = build(weights=assets["weights"], target="om", soc_version="Ascend310P3", batch_size=4, settings=s,
                    log=lambda *_: None)
        assert res.meta["files"] and list(res.meta["files"]) == ["nasnetlarge_bs4.om"]
        dyn = build(weights=assets["weights"], target="om", soc_version="Ascend310P3", gears=[1, 4, 8], settings=s,
                    log=lambda *_: None)
        assert list(dyn.meta["files"]) == ["nasnetlarge_dyn.om"]
    finally:
        w.stop()
    calls = [line.split() for line in log.read_text().splitlines()]
    flags = [dict(a.split("=", 1) for a in c) for c in calls]
    # the seed: atc --framework=5 --model=X.onnx --input_format=NCHW --input_shape="image:1,3,331,331"
    #           --output=X --log=debug --soc_version=Ascend${chip_name}
    seed_flags = {"--framework", "--model", "--input_format", "--input_shape", "--output", "--log", "--soc_version"}
    assert set(flags[0]) == seed_flags
    assert flags[0]["--framework"] == "5" and flags[0]["--input_format"] == "NCHW"
    assert flags[0]["--input_shape"] == "image:4,3,331,331" and flags[0]["--soc_version"] == "Ascend310P3"
    assert flags[0]["--model"].endswith("model.onnx") and os.path.isfile(flags[0]["--model"])
    assert set(flags[1]) == seed_flags | {"--dynamic_batch_size"}
    assert flags[1]["--input_shape"] == "image:-1,3,331,331" and flags[1]["--dynamic_batch_size"] == "1,4,8"


def test_eval_onnxruntime_from_the_built_artifact(assets, build_env, start_workers):
    s = _settings(build_env)
    queue = f"eval.ort-{uuid.uuid4().hex[:6]}"
    w = start_workers(build_env["url"], queue, n=2, backend="onnxruntime", settings=s)
    try:
        res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], backend="onnxruntime",
                       batch_size=4, shard_size=4, queue=queue, settings=s, progress=False, log=lambda *_: None)
    finally:
        w.stop()
    art = build(weights=assets["weights"], target="ort", settings=s, log=lambda *_: None)
    assert art.cached and res.report.model["artifact_key"] == art.key
    assert res.report.model["artifact"].startswith(art.path)
    ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"],
                         backend="onnxruntime", batch_size=4, settings=s)
    assert res.predictions["names"] == ref["names"] and res.predictions["top5"] == ref["top5"]
    assert np.allclose(res.predictions["scores"], ref["scores"], atol=1e-4)
    assert res.report.top1 == 100.0 and len(res.report.per_device) == 2


def test_raw_export_has_consecutive_slices_and_simplify_removes_them(assets, tmp_path):
    from nasq.artifacts import steps

    spec = make_spec(weights=assets["weights"], target="onnx", cache_dir=str(tmp_path))
    rows = []
    steps.export(spec, str(tmp_path), rows)
    raw = graph_facts(str(tmp_path / "raw.onnx"))
    assert raw["consecutive_slice_pairs"] > 0
    rec = steps.simplify(spec, str(tmp_path), rows)
    assert rec["graph"]["consecutive_slice_pairs"] == 0 and rec["graph"]["slice_nodes"] < raw["slice_nodes"]


def test_openvino_build_verified_then_cache_hit_and_eval_equals_the_reference(assets, build_env, nasq_cli, repo,
                                                                               tmp_path):
    """The IR built and verified, then found in the cache; `nasq eval --backend openvino` (embedded:
    a private Redis and worker, the IR taken from the same artifact cache) in fp32 gives the
    single-process reference's predictions image for image."""
    import json
    import subprocess

    s = _settings(build_env)
    res = build(weights=assets["weights"], target="ov", settings=s, log=lambda *_: None)
    rows = {r["step"]: r for r in res.meta["verification"]}
    assert rows["ov-fp32"]["ok"] and rows["ov-fp32"]["top1_agreement"] == 1.0 and rows["ov-fp32"]["max_rel"] <= 1e-4
    assert {"model.xml", "model.bin"} <= set(res.meta["files"]) and res.meta["versions"]["openvino"]
    again = build(weights=assets["weights"], target="ov", settings=s, log=lambda *_: None)
    assert again.cached and again.path == res.path

    # a batch split over streams (the cap forced: OpenVINO's own pick depends on the CPU) gives what
    # one image at a time gives, image for image: equal parts, the largest divisor under the cap
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.data.sources import open_source
    from nasq.model.spec import ModelRef

    source = open_source(assets["data"])
    crops = np.stack([source.load(i) for i in range(6)])
    one = backends.create("openvino", "cpu")
    one.load(ModelRef(res.path), batch_size=1, options=BackendOptions(threads=2))
    assert "1 stream(s)" in one.describe_device()
    singles = np.concatenate([one.predict_u8(c[None]) for c in crops])
    for n, cap, streams in ((4, 2, 2), (6, 4, 3), (5, 2, 1), (2, 8, 2)):
        b = backends.create("openvino", "cpu")
        b._max_streams = lambda cap=cap: cap
        b.load(ModelRef(res.path), batch_size=n, options=BackendOptions(threads=2))
        out = b.predict_u8(crops[:n])
        assert f"{streams} stream(s)" in b.describe_device() and len(b._plans[n][1]) == streams
        assert out.shape == (n, singles.shape[1]) and (out.argmax(1) == singles[:n].argmax(1)).all()
        assert np.abs(out - singles[:n]).max() <= 1e-5 * np.abs(singles).max()
    # a worker that ran -b 8 loads again for a -b 4 run (it would otherwise pad every batch of 4 to 8)
    from nasq.inference.resources import DeviceResources

    res8 = DeviceResources("cpu")
    assert res8.backend_for("openvino", ModelRef(res.path), 8, BackendOptions(threads=2)).fixed_batch == 8
    assert res8.backend_for("openvino", ModelRef(res.path), 4, BackendOptions(threads=2)).fixed_batch == 4
    # a request failing to start leaves none running: the next batch runs
    real = b._plans[2][1][1]

    class Failing:
        def start_async(self, *a, **k):
            raise RuntimeError("injected")
    b._plans[2][1][1] = Failing()
    with pytest.raises(RuntimeError, match="injected"):
        b.predict_u8(crops[:2])
    b._plans[2][1][1] = real
    assert np.abs(b.predict_u8(crops[:2]) - singles[:2]).max() <= 1e-5 * np.abs(singles).max()

    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env.update(NASQ_WORK_DIR=str(tmp_path / "runs"), NASQ_ARTIFACT_DIR=s.artifact_dir,
               NASQ_REPORT_DIR=str(tmp_path / "rep"))
    p = subprocess.run(nasq_cli + ["eval", "--backend", "openvino", "--weights", assets["weights"], "--data",
                                   assets["data"], "--labels", assets["labels"], "-b", "4", "--workers", "1",
                                   "--json", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.json"),
                                   "--no-progress"], capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    report, pred = json.loads((tmp_path / "r.json").read_text()), json.loads((tmp_path / "p.json").read_text())
    assert report["backend"]["name"] == "openvino" and report["precision"] in (None, "fp32")
    assert report["images"] == 20 and report["top1"] == 100.0
    ov_ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"],
                            backend="openvino", batch_size=4, settings=Settings(artifact_dir=s.artifact_dir))
    assert pred["names"] == ov_ref["names"] and pred["top5"] == ov_ref["top5"]
    torch_ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4)
    assert [t[0] for t in pred["top5"]] == [t[0] for t in torch_ref["top5"]]  # fp32: PyTorch's top-1, image for image
    scale = np.abs(np.asarray(torch_ref["scores"])).max()
    assert np.abs(np.asarray(pred["scores"])[:, 0] - np.asarray(torch_ref["scores"])[:, 0]).max() <= 1e-3 * scale


def test_a_changed_artifact_is_rebuilt_or_refused_never_used(assets, build_env, start_workers):
    """A built ORT model changed after it was built is never used: with a flipped byte, the next
    run's client finds that it does not match its meta.json, moves it aside and has the build
    queue build it again (the run is exact); a valid ONNX with other weights put in its place and
    given to the workers as the built model itself is refused by every worker in one line naming
    the file, and no shard of that run is scored."""
    import onnx
    from onnx import numpy_helper

    from nasq.errors import RunError

    s = _settings(build_env)
    queue = f"eval.tamper-{uuid.uuid4().hex[:6]}"
    w = start_workers(build_env["url"], queue, n=2, backend="onnxruntime", settings=s)
    art = build(weights=assets["weights"], target="ort", settings=s, log=lambda *_: None)
    model = os.path.join(art.path, "model.cpu.onnx")
    data = bytearray(open(model, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a flipped byte
    open(model, "wb").write(bytes(data))
    said = []
    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], backend="onnxruntime",
                   batch_size=4, queue=queue, settings=s, progress=False, log=said.append)
    assert any(f"artifact {art.key} (built)" in line for line in said), said  # built again, not a cache hit
    assert any(p.startswith(art.key) for p in os.listdir(os.path.join(s.artifact_dir, ".quarantine")))
    assert res.report.top1 == 100.0
    assert open(model, "rb").read() != bytes(data)  # the rebuilt file, not the changed one
    # a valid ONNX with other weights in its place (every matrix negated), given as the built model
    m = onnx.load(model)
    for init in m.graph.initializer:
        if len(init.dims) == 2:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(m, model)
    onnx.checker.check_model(model)
    w.stop()  # workers that start again load the artifact again (a loaded one was checked when it was loaded)
    w = start_workers(build_env["url"], queue, n=2, backend="onnxruntime", settings=s)
    with pytest.raises(RunError) as e:
        evaluate(weights=art.path, data=assets["data"], labels=assets["labels"], backend="onnxruntime", batch_size=4,
                 queue=queue, settings=s, progress=False, log=lambda *_: None)
    assert f"{model} does not match the artifact's meta.json" in str(e.value), e.value
    run_id = next(r for r in RunStore(build_env["url"]).runs.run_ids(3) if r in str(e.value))
    assert RunStore(build_env["url"]).ledger.shard_results(run_id) == {}  # nothing scored with it
    w.stop()
    again = build(weights=assets["weights"], target="ort", settings=s, log=lambda *_: None)
    assert not again.cached  # moved aside and built again for the next one
