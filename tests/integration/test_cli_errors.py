"""Every bad input ends in one line on stderr naming the flag or file, exit status 2, no
traceback, and nothing started (no Redis, no worker, no work folder)."""
import os
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest

from nasq.cli import main
from nasq.queue.redis_server import spawn_redis, stop_process

@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    proc, url = spawn_redis(["--save", "", "--appendonly", "no", "--requirepass", "right", "--dir",
                             str(tmp_path_factory.mktemp("pwredis"))], password="right")
    yield urlsplit(url).port
    stop_process(proc)


@pytest.fixture(scope="module")
def silent_broker():
    """A TCP server that accepts connections and never answers (a wedged or wrong service)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    class Port(int):
        """The port, and the connections the server accepted (``.held``)."""

    port = Port(srv.getsockname()[1])
    port.held = held
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


@pytest.fixture(scope="module")
def bad_inputs(assets, tmp_path_factory):
    """Files for the table: wrong labels, a folder without images, broken checkpoints."""
    import torch

    d = tmp_path_factory.mktemp("bad")
    lines = open(assets["labels"]).read().splitlines()
    lines[0] = lines[0].split()[0] + " 5000"
    lines[1] = lines[1].split()[0] + " -1"
    (d / "bad_labels.txt").write_text("\n".join(lines) + "\n")
    (d / "junk").mkdir()
    (d / "junk" / "a.JPEG").write_text("not an image\n")
    (d / "junk" / "notes.txt").write_text("hello\n")
    (d / "afile").write_text("x")
    state = torch.load(assets["weights"], weights_only=True)
    ten = dict(state, **{"last_linear.weight": state["last_linear.weight"][:10],
                         "last_linear.bias": state["last_linear.bias"][:10]})
    torch.save(ten, d / "ten_way.pth")
    torch.save({k: v for k, v in state.items() if k != "cell_0.conv_1x1.conv.weight"}, d / "missing_key.pth")
    torch.save(dict(state, **{"conv0.bn.weight": state["conv0.bn.weight"][:3]}), d / "wrong_shape.pth")
    (d / "corrupt.pth").write_bytes(os.urandom(2048))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'unpickled'}",))

    torch.save({"w": Evil()}, d / "hostile.pth")
    return d


W, D, L = "{weights}", "{data}", "{labels}"
EVAL = ["eval", "--weights", W, "--data", D, "--labels", L]
CASES = [
    ("batch-size 0", EVAL + ["--batch-size", "0"], "argument -b/--batch-size: must be 1 to 1024, not 0"),
    ("batch-size -1", EVAL + ["-b", "-1"], "argument -b/--batch-size: must be 1 to 1024, not -1"),
    ("batch-size word", EVAL + ["-b", "eight"], "expected an integer, not 'eight'"),
    ("workers 0", EVAL + ["--workers", "0"], "argument --workers: must be 1 to 256, not 0"),
    ("workers -3", EVAL + ["--workers", "-3"], "argument --workers: must be 1 to 256, not -3"),
    ("shard-size 0", EVAL + ["--shard-size", "0"], "argument --shard-size: must be 1 to 100000, not 0"),
    ("shard-size -5", EVAL + ["--shard-size", "-5"], "argument --shard-size: must be 1 to 100000, not -5"),
    ("precision fp64", EVAL + ["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
    ("device gpu0", EVAL + ["--device", "gpu0"], "argument --device: expected auto, cpu, cuda or a list"),
    ("timeout -1", EVAL + ["--timeout", "-1"], "argument --timeout: must be above 0"),
    ("labels 5000 and -1", ["eval", "--weights", W, "--data", D, "--labels", "{bad}/bad_labels.txt"],
     "2 image(s) have labels outside the ImageNet classes 0-999"),
    ("no usable image", ["eval", "--weights", W, "--data", "{bad}/junk"], "no usable image in"),
    ("json into a file's folder", EVAL + ["--json", "{bad}/afile/r.json"], "--json {bad}/afile/r.json: cannot create"),
    ("predictions into a file's folder", EVAL + ["--predictions", "{bad}/afile/p.csv"], "--predictions"),
    ("json is a folder", EVAL + ["--json", "{bad}"], "is a folder; give a file name"),
    ("10-way head", ["eval", "--weights", "{bad}/ten_way.pth", "--data", D], "the head has 10 outputs"),
    ("missing key", ["eval", "--weights", "{bad}/missing_key.pth", "--data", D], "1 missing (e.g. cell_0.conv_1x1"),
    ("wrong shape", ["eval", "--weights", "{bad}/wrong_shape.pth", "--data", D], "1 of the wrong shape"),
    ("1001 from 1000", ["eval", "--weights", "{bad}/ten_way.pth", "--data", D, "--num-outputs", "1001"], "outputs"),
    ("corrupt checkpoint", ["eval", "--weights", "{bad}/corrupt.pth", "--data", D], "corrupt, truncated"),
    ("hostile checkpoint", ["eval", "--weights", "{bad}/hostile.pth", "--data", D], "Python objects besides tensors"),
    ("missing weights", ["eval", "--weights", "{bad}/nothing.pth", "--data", D], "do not exist"),
    ("missing data", ["eval", "--weights", W, "--data", "{bad}/nowhere"], "does not exist"),
    ("index data on torch", ["eval", "--weights", W, "--data", "index:0"], "index:N with 1 <="),
    ("wrong password", EVAL + ["--broker", "redis://:wrong@127.0.0.1:{pw_port}/0"], "refused the credentials"),
    ("compile with a broker", EVAL + ["--broker", "redis://:right@127.0.0.1:{pw_port}/0", "--compile", "default"],
     "--compile set how the workers of an embedded run load the model"),
    ("cuda graphs with a broker", EVAL + ["--broker", "redis://127.0.0.1:1/0", "--cuda-graphs", "--kernels", "triton"],
     "--cuda-graphs, --kernels set how the workers of an embedded run load the model"),
    ("no password", EVAL + ["--broker", "redis://127.0.0.1:{pw_port}/0"], "wants a password"),
    ("unreachable broker", EVAL + ["--broker", "redis://127.0.0.1:1/0"], "cannot reach the broker redis://127.0.0.1:1/0"),
    ("silent broker", ["status", "--broker", "redis://127.0.0.1:{silent}/0"], "did not answer within 1 s"),
    ("status wrong password", ["runs", "--broker", "redis://:wrong@127.0.0.1:{pw_port}/0"], "refused the credentials"),
    ("sweep batch 0", ["sweep", "--weights", W, "--data", D, "-b", "0,4"], "argument -b/--batch-sizes: must be 1 to"),
    ("sweep images -1", ["sweep", "--weights", W, "--data", D, "-b", "4", "--images", "-1"], "argument --images"),
    ("bench min-time 0", ["bench", "--min-time", "0"], "argument --min-time: must be above 0"),
    ("bench device", ["bench", "--device", "tpu"], "argument --device: device must be cpu, cuda:N or npu:N"),
    ("build opset 5", ["build", "--weights", W, "--opset", "5"], "argument --opset: must be 11 to 21, not 5"),
    ("build batch", ["build", "--weights", W, "-b", "4,0"], "argument -b/--batch-size: must be 1 to 1024, not 0"),
    ("build tolerance", ["build", "--weights", W, "--tolerance", "-1"], "argument --tolerance"),
    ("runs limit 0", ["runs", "--limit", "0"], "argument --limit: must be 1 to"),
    ("status interval", ["status", "--interval", "0"], "argument --interval: must be above 0"),
    ("demo images 0", ["demo", "--images", "0"], "argument --images: must be 1 to 100000, not 0"),
    ("demo workers", ["demo", "--workers", "0"], "argument --workers: must be 1 to 64, not 0"),
    ("preprocess workers", ["preprocess", D, "{bad}/pp", "--workers", "0"], "argument --workers: must be 1 to"),
    ("flower port", ["flower", "--port", "70000", "--no-auth"], "argument --port: must be 1 to 65535"),
    ("flower auth", ["flower", "--basic-auth", "nopassword", "--broker", "redis://127.0.0.1:1/0"], "user:password"),
    ("flower auth file", ["flower", "--basic-auth-file", "{bad}/none.txt", "--broker", "redis://127.0.0.1:1/0"],
     "--basic-auth-file"),
    ("resume json", ["resume", "r1", "--json", "{bad}/afile/r.json"], "--json"),
    ("ais_bench without a chip", EVAL + ["--backend", "ais_bench", "--device", "npu:0"], "pass --soc-version"),
    ("ais_bench on no NPU", EVAL + ["--backend", "ais_bench", "--soc-version", "Ascend310P3"],
     "--backend ais_bench runs on Ascend NPUs: name them"),
    ("ais_bench batch not a gear", EVAL + ["--backend", "ais_bench", "--soc-version", "310P3", "--gears", "1,4",
                                           "-b", "3", "--device", "npu:0"], "-b 3 is not one of the gears 1,4"),
    ("gears 0", EVAL + ["--backend", "ais_bench", "--gears", "0,4"], "argument --gears: must be 1 to 1024, not 0"),
    ("soc-version on torch", EVAL + ["--soc-version", "Ascend310P3"], "do not apply to --backend torch"),
    ("one gear", EVAL + ["--backend", "ais_bench", "--soc-version", "310P3", "--gears", "8", "-b", "8", "--device",
                         "npu:0"], "ATC takes 2 to 100 different gears"),
    ("repeated gears", EVAL + ["--backend", "ais_bench", "--soc-version", "310P3", "--gears", "4,4,8", "-b", "4",
                               "--device", "npu:0"], "ATC takes 2 to 100 different gears"),
    ("bad chip", EVAL + ["--backend", "ais_bench", "--soc-version", "bad chip;x", "--device", "npu:0"],
     "is not a chip name such as Ascend310P3"),
    ("build bad chip", ["build", "--weights", W, "--target", "om", "--soc-version", "310P3;rm"], "is not a chip name"),
]


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_starts_nothing(name, argv, expected, assets, bad_inputs, password_redis,
                                                  silent_broker, tmp_path, monkeypatch, capsys):
    fill = {"weights": assets["weights"], "data": assets["data"], "labels": assets["labels"], "bad": str(bad_inputs),
            "pw_port": password_redis, "silent": silent_broker}
    for k in [k for k in os.environ if k.startswith("NASQ_") or k.startswith("FLOWER_")]:
        monkeypatch.delenv(k)
    work = tmp_path / "runs"
    monkeypatch.setenv("NASQ_WORK_DIR", str(work))
    monkeypatch.setenv("NASQ_BROKER_SOCKET_TIMEOUT_S", "1")
    try:
        rc = main([a.format(**fill) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    broker = any(w in expected for w in ("wants a password", "reach the broker", "did not answer", "refused the credentials"))
    assert rc == (5 if broker else 2), (out, err)  # the broker's fault, or the input's (nasq.cli.exits)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("nasq")
    assert expected.format(**fill) in lines[0], lines[0]
    assert not work.exists()  # no private Redis, no worker, no run folder
    assert not (bad_inputs / "unpickled").exists()


def test_debug_shows_the_traceback(assets, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("NASQ_BROKER_URL", raising=False)
    rc = main(["eval", "--weights", str(tmp_path / "none.pth"), "--data", assets["data"], "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("nasq eval: error: weights")


def test_the_installed_command_and_the_worker_answer_in_one_line(nasq_cli, repo):
    """The same through real processes: `nasq` and `nasq worker` (which has its own parser)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    for argv, expected in ((["eval", "--weights", "w.pth", "--data", "d", "-b", "0"], "must be 1 to 1024"),
                           (["worker", "--threads", "0", "--broker", "redis://127.0.0.1:1/0"], "argument --threads"),
                           (["worker", "--device", "cuda:x", "--broker", "redis://127.0.0.1:1/0"], "cpu, cuda:N"),
                           (["worker", "-P", "threads", "--broker", "redis://127.0.0.1:1/0"], "one process per device"),
                           (["worker", "--threds", "2", "--broker", "redis://127.0.0.1:1/0"], "unrecognized argument")):
        p = subprocess.run(nasq_cli + argv, capture_output=True, text=True, cwd=repo, env=env, timeout=60)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and expected in p.stderr, p.stderr


def test_a_deployment_environment_with_a_missing_signing_key_is_one_error_not_a_traceback(nasq_cli, repo, tmp_path,
                                                                                           redis_url):
    """The worker's Celery app reads the deployment's settings when it is imported (for
    `celery -A workers.app`); settings it cannot use leave it unconfigured there, and `nasq
    worker` says what is wrong in its own one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    missing = str(tmp_path / "no-such.key")
    env.update(NASQ_BROKER_URL=redis_url, NASQ_SIGNING_KEY=missing, NASQ_SIGNING_CERT=missing,
               NASQ_SIGNING_CERT_STORE=str(tmp_path))
    p = subprocess.run(nasq_cli + ["worker", "--backend", "sim"], capture_output=True, text=True, cwd=repo, env=env,
                       timeout=60)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"nasq worker: error: signing_key {missing} does not exist", p.stderr


def test_output_folders_are_made_first_and_a_full_disk_is_one_line(assets, tmp_path, monkeypatch, capsys):
    """--json into a folder that does not exist yet: made first, written after the run. Then the
    same report written onto a real full disk (a 64 KiB tmpfs, filled): one line saying where the
    report is kept, and no temporary file left."""
    import json
    from dataclasses import replace

    from nasq.api import EvalResult
    from nasq.rundata import Report
    from nasq.cli import finish
    from nasq.errors import NasqError

    monkeypatch.delenv("NASQ_BROKER_URL", raising=False)
    monkeypatch.setenv("NASQ_WORK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NASQ_REPORT_DIR", str(tmp_path / "reports"))
    out = tmp_path / "new" / "deeper" / "r.json"
    rc = main(["eval", "--weights", assets["weights"], "--data", assets["data"], "--labels", assets["labels"],
               "--workers", "1", "-b", "4", "--json", str(out), "--no-progress"])
    assert rc == 0 and out.is_file()
    report = Report.from_payload(json.loads(out.read_text()))

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode == 0
    try:
        if mounted:
            with open(disk / "filler", "wb") as f:
                try:
                    f.write(b"\0" * (1 << 20))
                except OSError:
                    pass
        else:  # not allowed to mount here: the same failure, injected where the bytes are written
            import nasq.files as files

            real = files.os.fdopen

            def full(fd, *a, **kw):
                f = real(fd, *a, **kw)
                f.write = lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device"))
                return f
            monkeypatch.setattr(files.os, "fdopen", full)
        report = replace(report, extra={"padding": "x" * 200_000})  # more than the disk holds
        args = type("Args", (), {"json": str(disk / "r.json"), "predictions": None})()
        with pytest.raises(NasqError) as e:
            finish(EvalResult(report.run_id, report, None), args)
        assert "No space left on device" in str(e.value) and report.files["json"] in str(e.value)
        assert f"nasq status {report.run_id}" in str(e.value) and "\n" not in str(e.value)
        assert [f for f in os.listdir(disk) if f != "filler"] == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def test_worker_exits_promptly_against_a_silent_broker_and_at_once_on_a_wrong_password(silent_broker, password_redis,
                                                                                       repo, tmp_path):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    log = tmp_path / "silent.log"
    before = len(silent_broker.held)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--broker", f"redis://127.0.0.1:{silent_broker}/0"],
                                cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline and len(silent_broker.held) == before:
        time.sleep(0.05)  # until it has connected, and is blocked waiting for an answer that never comes
    assert len(silent_broker.held) > before and proc.poll() is None
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert time.time() - t < 10
    # with a short socket timeout it says what is wrong while it waits
    env2 = dict(env, NASQ_BROKER_SOCKET_TIMEOUT_S="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--broker", f"redis://127.0.0.1:{silent_broker}/0"],
                                cwd=repo, env=env2, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline and "did not answer within 1 s" not in log.read_text():
        time.sleep(0.3)
    assert "waiting for the broker" in log.read_text() and "did not answer within 1 s" in log.read_text()
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert time.time() - t < 10
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "workers", "--broker", f"redis://:wrong@127.0.0.1:{password_redis}/0"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and time.time() - t < 10
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "refused the credentials" in p.stderr
    assert "wrong" not in p.stderr  # the password is not printed


def test_a_worker_refuses_a_device_this_machine_does_not_have(assets, nasq_cli, repo, tmp_path):
    """A GPU or NPU that is not there: one line, exit 2, before the worker waits for its broker (the
    broker here is a closed port, so a worker that did not refuse at once would wait for it
    forever), and an embedded run starts nothing."""
    import shutil
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    no_broker = ["--broker", "redis://127.0.0.1:1/0"]
    cases = [(["--device", "npu:0", "--backend", "ais_bench"], "needs ais_bench, which is not installed"),
             (["--device", "cuda:7", "--backend", "onnxruntime"], "cuda:7")]
    if not shutil.which("nvidia-smi"):
        cases.insert(0, (["--device", "cuda:0"], "no NVIDIA GPU on this machine"))
    for argv, expected in cases:
        t = time.time()
        p = subprocess.run(nasq_cli + ["worker", *argv, *no_broker], capture_output=True, text=True, cwd=repo, env=env,
                           timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and expected in lines[0], p.stderr
        print(f"{' '.join(argv)}: {lines[0]} ({time.time() - t:.1f} s)")
    # an NPU the machine does not have, with ais_bench and CANN's runtime there (their test doubles): 2 NPUs
    doubles = os.path.join(repo, "tests", "doubles")
    p = subprocess.run(nasq_cli + ["worker", "--device", "npu:5", "--backend", "ais_bench", *no_broker],
                       capture_output=True, text=True, cwd=repo, timeout=120,
                       env=dict(env, PYTHONPATH=doubles, ASCEND_DOUBLE_NPUS="2"))
    assert p.returncode == 2 and "no NPU 5 visible to CANN" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    if not shutil.which("nvidia-smi"):  # an embedded run on a GPU that is not there: nothing started
        work = tmp_path / "runs"
        p = subprocess.run(nasq_cli + ["eval", "--weights", assets["weights"], "--data", assets["data"], "--device",
                                       "cuda:0"], capture_output=True, text=True, cwd=repo, timeout=120,
                           env=dict(env, NASQ_WORK_DIR=str(work)))
        assert p.returncode == 2 and "no NVIDIA GPU on this machine" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not work.exists()
