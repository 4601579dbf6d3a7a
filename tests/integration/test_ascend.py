"""The Ascend path held to its contract: ``nasq build --target om`` through an ATC double and the
ais_bench adapter through a double of ``ais_bench.infer.interface.InferSession`` (both in
tests/doubles, written from the tools' documentation and backed by ONNX Runtime), up to a whole
``nasq eval --backend ais_bench`` on two pinned NPU workers."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from nasq.api import build, evaluate_local
from nasq.artifacts.spec import make_spec
from nasq.artifacts.steps import atc_commands
from nasq.artifacts.store import ArtifactStore
from nasq.backends.ais_bench_backend import AisBenchBackend
from nasq.config import BackendOptions, Settings
from nasq.data.labels import read_labels
from nasq.data.sources import open_source
from nasq.errors import BackendError
from nasq.inference.evaluate import evaluate_range
from nasq.model.spec import ModelRef

pytestmark = pytest.mark.slow  # model builds / a broker restarted: minutes

DOUBLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "doubles")
SOC = "Ascend310P3"
GEARS = [1, 4, 6]


@pytest.fixture(scope="module")
def ascend(tmp_path_factory, assets):
    """A machine that looks like a CANN host to nasq: ``atc`` on PATH (the double), the ais_bench
    double importable, both logging to files; and two .om builds of the test checkpoint made by the
    real build pipeline (a private build worker): a static one for batch 6 and one with gears."""
    root = tmp_path_factory.mktemp("ascend")
    bindir = root / "bin"
    bindir.mkdir()
    atc = bindir / "atc"
    atc.write_text(f"#!/bin/sh\nexec {sys.executable} {os.path.join(DOUBLES, 'atc.py')} \"$@\"\n")
    atc.chmod(0o755)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [DOUBLES, os.environ.get("PYTHONPATH")])),
           "ATC_DOUBLE_LOG": str(root / "atc.log"), "AIS_BENCH_DOUBLE_LOG": str(root / "ais.log"),
           "ASCEND_DOUBLE_NPUS": "2"}
    settings = Settings(artifact_dir=str(root / "art"), work_dir=str(root / "runs"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.syspath_prepend(DOUBLES)
        static = build(weights=assets["weights"], target="om", soc_version=SOC, batch_size=6, settings=settings,
                       log=lambda *_: None)
        gears = build(weights=assets["weights"], target="om", soc_version=SOC, gears=GEARS, settings=settings,
                      log=lambda *_: None)
        yield {"root": root, "env": env, "settings": settings, "static": static, "gears": gears,
               "ais_log": root / "ais.log", "atc_log": root / "atc.log"}


def _events(path, since: int = 0) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path).read().splitlines()[since:]]


def _onnx_dir(ascend, res) -> str:
    """The ONNX artifact the .om was compiled from (what the ORT reference runs)."""
    return ArtifactStore(ascend["settings"].artifact_dir).path(res.meta["spec"]["onnx_key"])


def _reference(assets, ascend, res, batch_size: int) -> dict:
    return evaluate_local(weights=_onnx_dir(ascend, res), data=assets["data"], labels=assets["labels"],
                          backend="onnxruntime", batch_size=batch_size, settings=ascend["settings"])


def _same(pred: dict, ref: dict) -> None:
    assert pred["names"] == ref["names"] and pred["top5"] == ref["top5"]
    scale = np.abs(np.asarray(ref["scores"])).max()
    assert np.abs(np.asarray(pred["scores"]) - np.asarray(ref["scores"])).max() <= 1e-4 * scale


# ------------------------------------------------------------------------------ builds

def test_om_builds_run_the_seed_atc_command_and_record_what_was_verified(ascend):
    calls = [json.loads(line)["argv"] for line in ascend["atc_log"].read_text().splitlines()]
    assert len(calls) == 2  # one ATC call per build
    for res, shape, extra, name in ((ascend["static"], "image:6,3,331,331", [], "nasnetlarge_bs6"),
                                    (ascend["gears"], "image:-1,3,331,331", ["--dynamic_batch_size=1,4,6"],
                                     "nasnetlarge_dyn")):
        onnx = os.path.join(_onnx_dir(ascend, res), "model.onnx")
        argv = next(c for c in calls if f"--input_shape={shape}" in c)
        assert argv == ["--framework=5", f"--model={onnx}", "--input_format=NCHW", f"--input_shape={shape}",
                        f"--output={os.path.join(os.path.dirname(argv[4].split('=', 1)[1]), name)}", "--log=error",
                        f"--soc_version={SOC}", *extra]
        assert [f for f in res.meta["files"] if f.endswith(".om")] == [f"{name}.om"]  # no stray suffix
        step = next(s for s in res.meta["steps"] if s["name"] == "atc")
        assert step["command"].startswith("atc --framework=5 ") and step["verification"] is None
        assert res.meta["verified_steps"] == ["export", "simplify"]
        assert [u["step"] for u in res.meta["unverified_steps"]] == ["atc"]
        assert "Ascend NPU" in res.meta["unverified_steps"][0]["reason"]
    # the gear build's ONNX keeps a dynamic batch (ATC cannot make a static model dynamic)
    static_onnx = os.path.join(_onnx_dir(ascend, ascend["static"]), "model.onnx")
    p = subprocess.run([sys.executable, os.path.join(DOUBLES, "atc.py"), "--framework=5", f"--model={static_onnx}",
                        "--input_shape=image:-1,3,331,331", "--dynamic_batch_size=1,4",
                        f"--output={ascend['root'] / 'x'}", f"--soc_version={SOC}"],
                       capture_output=True, text=True, env={**os.environ, "ATC_DOUBLE_LOG": ""})
    assert p.returncode == 1 and "cannot be made dynamic" in p.stdout


def test_seed_command_shape(tmp_path):
    """The seed's ATC line, its slip (an output named .onnx) corrected, is nasq's for batch 1."""
    import shlex

    seed = shlex.split('atc --framework=5 --model=nasnetlarge_sim1_merge.onnx --input_format=NCHW '
                       '--input_shape="image:1,3,331,331" --output=nasnetlarge_bs1 --log=debug '
                       '--soc_version=Ascend310P3')
    spec = make_spec(weights=__file__, target="om", soc_version="310P3", batch_size=1, cache_dir=str(tmp_path))
    ours = atc_commands(spec, "nasnetlarge_sim1_merge.onnx", None)[0]
    assert [a for a in ours if not a.startswith("--log")] == [a for a in seed if not a.startswith("--log")]


# ------------------------------------------------------------------------------ the double itself

def test_the_double_enforces_the_documented_contract(ascend):
    from ais_bench.infer.interface import InferSession  # the double: tests/doubles is on sys.path here

    om = os.path.join(ascend["gears"].path, "nasnetlarge_dyn.om")
    s = InferSession(0, om)
    desc = s.get_inputs()[0]
    assert desc.shape == [-1, 3, 331, 331] and desc.size == 6 * 3 * 331 * 331 * 4 and desc.format == 0
    x = np.zeros((4, 3, 331, 331), np.float32)
    with pytest.raises(RuntimeError, match="dymBatch parameter is not correct"):
        s.infer([np.zeros((3, 3, 331, 331), np.float32)], mode="dymbatch")
    with pytest.raises(RuntimeError, match="float32"):
        s.infer([x.astype(np.float64)], mode="dymbatch")
    with pytest.raises(RuntimeError, match="contiguous"):
        s.infer([np.asfortranarray(x)], mode="dymbatch")
    with pytest.raises(RuntimeError, match="static mode on a dymbatch model"):
        s.infer([x], mode="static")
    assert s.infer([x], mode="dymbatch")[0].shape == (4, 1001)
    assert len(s.summary().exec_time_list) == 1 and not hasattr(s, "free_device")
    s.free_resource()
    with pytest.raises(RuntimeError, match="freed"):
        s.infer([x], mode="dymbatch")
    st = InferSession(0, os.path.join(ascend["static"].path, "nasnetlarge_bs6.om"))
    with pytest.raises(RuntimeError, match="not a dymbatch model"):
        st.infer([np.zeros((6, 3, 331, 331), np.float32)], mode="dymbatch")
    with pytest.raises(RuntimeError, match="not match"):
        st.infer([x], mode="static")
    with pytest.raises(RuntimeError, match="does not exist"):
        InferSession(2, om)  # ASCEND_DOUBLE_NPUS=2


def test_the_adapter_explains_an_om_that_ais_bench_refuses_to_open(ascend, tmp_path):
    """0.0.2 refuses a group-writable .om or a symlink with ValueError: one line that says why."""
    om = tmp_path / "shared.om"
    shutil.copy(os.path.join(ascend["gears"].path, "nasnetlarge_dyn.om"), om)
    om.chmod(0o664)
    with pytest.raises(BackendError, match="writable by group or others.*not writable by group"):
        AisBenchBackend("npu:0").load(ModelRef(str(om)), batch_size=4)
    om.chmod(0o644)
    link = tmp_path / "link.om"
    link.symlink_to(om)
    with pytest.raises(BackendError, match="soft link"):
        AisBenchBackend("npu:0").load(ModelRef(str(link)), batch_size=4)


# ------------------------------------------------------------------------------ the adapter

def test_adapter_static_om_pads_short_batches_and_reports_npu_time(ascend, assets):
    source, labels = open_source(assets["data"]), read_labels(assets["labels"])
    b = AisBenchBackend("npu:0")
    with pytest.raises(BackendError, match="compiled for batch 6; run it with -b 6"):
        b.load(ModelRef(ascend["static"].path), batch_size=4)
    n = len(_events(ascend["ais_log"]))
    b.load(ModelRef(ascend["static"].path), batch_size=6)
    warm = [e["batch"] for e in _events(ascend["ais_log"], n) if e["event"] == "infer"]
    assert warm == [6] and b.model_info["compute_precision"].startswith("force_fp16")
    n = len(_events(ascend["ais_log"]))
    lat: list[float] = []
    out = evaluate_range(source, b, 0, len(source), batch_size=6, labels=labels, latencies=lat)
    b.close()
    _same(out, _reference(assets, ascend, ascend["static"], 6))
    ev = _events(ascend["ais_log"], n)
    assert [e["batch"] for e in ev if e["event"] == "infer"] == [6, 6, 6, 6]  # the last (2 images) padded
    assert {e["mode"] for e in ev if e["event"] == "infer"} == {"static"} and ev[-1]["event"] == "free_resource"
    assert out["timing"]["compute_clock"] == "device" and len(lat) == 4 and all(x > 0 for x in lat)


def test_adapter_gears_pick_the_smallest_gear_that_holds_a_batch(ascend, assets):
    b = AisBenchBackend("npu:0")
    with pytest.raises(BackendError, match=r"batch size 3 is not one of .*gears \(1, 4, 6\)"):
        b.load(ModelRef(ascend["gears"].path), batch_size=3)
    n = len(_events(ascend["ais_log"]))
    b.load(ModelRef(ascend["gears"].path), batch_size=4)
    assert [e["batch"] for e in _events(ascend["ais_log"], n) if e["event"] == "infer"] == [1, 4, 6]  # warm-ups
    assert b.take_device_ms() is None  # the warm-ups are not a batch's time
    x = np.random.default_rng(0).standard_normal((6, 3, 331, 331)).astype(np.float32)
    n = len(_events(ascend["ais_log"]))
    outs = {k: b.predict(x[:k]) for k in (6, 5, 4, 2, 1)}  # 6 and 5: what a reused worker sees after -b 6
    assert [e["batch"] for e in _events(ascend["ais_log"], n)] == [6, 6, 4, 4, 1]
    full = outs[6]
    for k, out in outs.items():
        assert out.shape == (k, 1001) and np.abs(out - full[:k]).max() <= 1e-4 * np.abs(full).max()
    ms = b.take_device_ms()
    assert ms is not None and ms > 0 and b.take_device_ms() is None
    b.close()


def test_adapter_with_an_om_not_built_by_nasq(ascend, tmp_path):
    """No meta.json beside it: the batch size must be a gear, as aclruntime checks."""
    om = tmp_path / "model.om"
    shutil.copy(os.path.join(ascend["gears"].path, "nasnetlarge_dyn.om"), om)
    b = AisBenchBackend("npu:0")
    with pytest.raises(BackendError, match="not a gear.*dymBatch parameter is not correct"):
        b.load(ModelRef(str(om)), batch_size=5)
    b.load(ModelRef(str(om)), batch_size=4)
    assert b.predict(np.zeros((3, 3, 331, 331), np.float32)).shape == (3, 1001)
    b.close()
    with pytest.raises(BackendError, match="runs a compiled .om"):
        AisBenchBackend("npu:0").load(ModelRef(str(tmp_path / "model.onnx")), batch_size=4)


@pytest.fixture
def double_reloaded():
    """``reload()`` re-imports the ais_bench double (it reads ASCEND_RT_VISIBLE_DEVICES at import,
    as the runtime reads it once); the original is restored afterwards."""
    import importlib

    import ais_bench.infer.interface as interface

    yield lambda: importlib.reload(interface)
    importlib.reload(interface)


def test_adapter_honours_an_inherited_visible_devices_variable(ascend, monkeypatch, double_reloaded):
    from workers.pinning import pinning_env

    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1")  # a scheduler gave this process NPU 1 only
    assert pinning_env("npu:0")[0] == {"ASCEND_RT_VISIBLE_DEVICES": "1"}
    with pytest.raises(ValueError, match="may see only 1 device"):
        pinning_env("npu:1")
    with pytest.raises(BackendError, match="changed after ais_bench was imported"):
        AisBenchBackend("npu:0").load(ModelRef(ascend["gears"].path), batch_size=4)
    double_reloaded()
    n = len(_events(ascend["ais_log"]))
    b = AisBenchBackend("npu:0")
    b.load(ModelRef(ascend["gears"].path), batch_size=4, options=BackendOptions())
    assert _events(ascend["ais_log"], n)[0]["physical"] == "1" and b.environment()["visible_npu"] == "1"
    b.close()
    with pytest.raises(BackendError, match="could not load"):
        AisBenchBackend("npu:1").load(ModelRef(ascend["gears"].path), batch_size=4)
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")


def test_device_time_of_both_summary_formats():
    from nasq.backends.ais_bench_backend import device_ms

    assert device_ms([(10.0, 12.5), (20.0, 21.0)]) == pytest.approx(3.5)  # 0.0.2: (start, end) ms
    assert device_ms([2.5, 1.0]) == pytest.approx(3.5)  # earlier: durations in ms
    assert device_ms([]) == 0.0


# ------------------------------------------------------------------------------ a whole run

def test_eval_on_two_pinned_npus_equals_the_ort_reference(ascend, assets, nasq_cli, repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env.update(ascend["env"], NASQ_WORK_DIR=str(tmp_path / "runs"), NASQ_ARTIFACT_DIR=ascend["settings"].artifact_dir,
               NASQ_REPORT_DIR=str(tmp_path / "rep"))
    n = len(_events(ascend["ais_log"]))
    p = subprocess.run(nasq_cli + ["eval", "--backend", "ais_bench", "--weights", assets["weights"], "--data",
                                   assets["data"], "--labels", assets["labels"], "--soc-version", SOC, "--gears",
                                   "1,4,6", "-b", "6", "--device", "npu:0,npu:1", "--shard-size", "6",
                                   "--json", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.json"),
                                   "--no-progress"], capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    report, pred = json.loads((tmp_path / "r.json").read_text()), json.loads((tmp_path / "p.json").read_text())
    assert report["backend"]["name"] == "ais_bench" and report["images"] == 20
    _same(pred, _reference(assets, ascend, ascend["gears"], 6))
    ev = _events(ascend["ais_log"], n)
    sessions = [e for e in ev if e["event"] == "session"]
    assert sorted(e["physical"] for e in sessions) == ["0", "1"] and len({e["pid"] for e in sessions}) == 2
    assert all(e["visible_at_import"] == e["physical"] and e["device_id"] == 0 for e in sessions)  # pinned before import
    batches = sorted(e["batch"] for e in ev if e["event"] == "infer")
    assert batches == [1, 1, 4, 4, 4, 6, 6, 6, 6, 6]  # a warm-up per gear per worker; 6+6+6 images, then 2 on gear 4
    devices = {d["device"]: d for d in report["per_device"]}
    assert set(devices) == {"npu:0", "npu:1"}
    assert all(d["compute_clock"] == "device" and d["img_s_ais_bench"] for d in devices.values())
    assert devices["npu:0"]["device_name"].startswith("Ascend310P3, ais_bench")
    assert {d["host"] for d in devices.values()} == {socket.gethostname()}
    assert report["model"]["compute_precision"].startswith("force_fp16")
    assert "computes in force_fp16" in open(report["files"]["markdown"]).read()
