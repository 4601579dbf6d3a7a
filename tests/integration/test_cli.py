"""The commands as a user runs them: separate processes, embedded and with a broker."""
import json
import os
import subprocess
import sys
import uuid

import pytest

@pytest.fixture
def run(nasq_cli, repo):
    """``run(args, env=...)``: the nasq command in a separate process, without a configured broker."""
    def run_(args, env=None, timeout=300):
        e = dict(os.environ)
        e.pop("NASQ_BROKER_URL", None)
        e.update(env or {})
        return subprocess.run(nasq_cli + args, capture_output=True, text=True, timeout=timeout, cwd=repo, env=e)

    return run_


@pytest.mark.parametrize("cmd", [[], ["eval"], ["demo"], ["preprocess"], ["worker"], ["build"], ["bench"], ["sweep"],
                                 ["status"], ["runs"], ["resume"], ["flower"], ["compare"], ["cancel"], ["sweeps"],
                                 ["metrics"]])
def test_help_everywhere(run, cmd):
    p = run(cmd + ["--help"])
    assert p.returncode == 0 and "usage: nasq" in p.stdout
    if cmd:  # every command shows an example
        assert "xample" in p.stdout, p.stdout


def test_producer_help(repo):
    p = subprocess.run([sys.executable, "-m", "producer", "--help"], capture_output=True, text=True, cwd=repo)
    assert p.returncode == 0 and "usage: python -m producer" in p.stdout


def test_embedded_eval_of_a_users_folder(run, assets, tmp_path):
    out = tmp_path / "r.json"
    p = run(["eval", "--weights", assets["weights"], "--data", assets["data"], "--labels", assets["labels"],
             "--workers", "2", "--batch-size", "4", "--json", str(out), "--predictions", str(tmp_path / "p.csv")],
            env={"NASQ_WORK_DIR": str(tmp_path / "runs")})
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    for key in ("run_id", "images", "top1", "top5", "throughput_img_s", "per_device", "errors"):
        assert key in r
    assert r["images"] == 20 and r["top1"] == 100.0 and r["error_count"] == 3
    assert len(r["per_device"]) == 2
    assert "top-1 100.00%" in p.stdout and "excluded images (3)" in p.stdout
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("image,label,top1") and len(lines) == 21
    # everything it started is gone: no redis-server or worker left with that work dir
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "runs") not in ps


def test_demo_tiny(run, tmp_path):
    p = run(["demo", "--images", "12", "--workers", "2", "--arch", "tiny", "--workdir", str(tmp_path / "d"),
             "--json", str(tmp_path / "r.json"), "--batch-size", "4"], env={"NASQ_WORK_DIR": str(tmp_path / "runs")})
    assert p.returncode == 0, p.stderr
    assert "RANDOM weights" in p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == 12 and r["top1"] >= 99.0
    assert (tmp_path / "d" / "val_label.txt").exists() and (tmp_path / "d" / "nasnetalarge-random-tiny.pth").exists()


def test_md5_mismatch_refused_before_anything_runs(run, assets, tmp_path):
    bad = tmp_path / "nasnetalarge-a1897284.pth"
    bad.write_bytes(open(assets["weights"], "rb").read())
    p = run(["eval", "--weights", str(bad), "--data", assets["data"], "--labels", assets["labels"]])
    assert p.returncode == 2
    assert "md5 is" in p.stderr and "78a73e51ee50997294f1f35a34b4de66" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_inputs_give_clear_errors(run, assets, tmp_path):
    p = run(["eval", "--weights", assets["weights"], "--data", str(tmp_path / "nowhere")])
    assert p.returncode == 2 and "does not exist" in p.stderr
    (tmp_path / "l.txt").write_text("other_image.JPEG 3\n")
    p = run(["eval", "--weights", assets["weights"], "--data", assets["data"], "--labels", str(tmp_path / "l.txt")])
    assert p.returncode == 2 and "right label file" in p.stderr
    p = run(["worker", "--device", "gpu0", "--broker", "redis://127.0.0.1:1/0"])
    assert p.returncode == 2 and "cpu, cuda:N or npu:N" in p.stderr
    p = run(["worker"])
    assert p.returncode == 2 and "no broker" in p.stderr


def test_worker_and_eval_with_broker_as_separate_processes(run, assets, redis_url, start_workers, repo, tmp_path):
    queue = f"eval.cli-{uuid.uuid4().hex[:6]}"
    w = start_workers(redis_url, queue)  # `python -m workers` is what `nasq worker` execs
    try:
        out = tmp_path / "r.json"
        p = run(["eval", "--broker", redis_url, "--queue", queue, "--weights", assets["weights"], "--data",
                 assets["data"], "--labels", assets["labels"], "--batch-size", "4", "--json", str(out)])
        assert p.returncode == 0, p.stderr
        r = json.loads(out.read_text())
        assert r["images"] == 20 and r["top1"] == 100.0
        assert [d["worker"] for d in r["per_device"]] == [w.names[0]]
        assert "private Redis" not in p.stderr
        # the producer queues the same run and returns at once; `nasq status --watch` follows it
        p = subprocess.run([sys.executable, "-m", "producer", "--broker", redis_url, "--queue", queue, "--weights",
                            assets["weights"], "--data", assets["data"], "--batch-size", "4"],
                           capture_output=True, text=True, timeout=120, cwd=repo)
        assert p.returncode == 0, p.stderr
        run_id = p.stdout.strip()
        st = run(["status", run_id, "--watch", "--interval", "0.3", "--broker", redis_url])
        assert st.returncode == 0, st.stderr
        assert "top-1 100.00%" in st.stdout and "images 23/23" in st.stdout
    finally:
        w.stop()


def test_nasq_worker_command_starts_a_worker(assets, redis_url, nasq_cli, repo, tmp_path):
    """`nasq worker` itself (not python -m workers) joins the broker and answers a ping."""
    import signal
    import time

    from nasq.config import Settings
    from nasq.queue.app import make_app

    name = f"clitest-{uuid.uuid4().hex[:6]}@localhost"
    with open(tmp_path / "w.log", "wb") as log:
        proc = subprocess.Popen(nasq_cli + ["worker", "--device", "cpu", "--broker", redis_url, "--name", name,
                                              "--queues", f"q-{name}"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=repo, start_new_session=True)
    try:
        app = make_app(Settings(broker_url=redis_url))
        deadline = time.time() + 90
        while time.time() < deadline:
            if any(name in r for r in app.control.ping(destination=[name], timeout=1.0) or []):
                break
            assert proc.poll() is None, (tmp_path / "w.log").read_text()
        else:
            raise AssertionError("nasq worker did not answer")
        stats = app.control.inspect(destination=[name], timeout=2).stats()[name]
        assert stats["pool"]["max-concurrency"] == 1 and stats["prefetch_count"] == 1
        # a second worker under a name that is live is refused, in one line
        twin = subprocess.run(nasq_cli + ["worker", "--broker", redis_url, "--name", name], capture_output=True,
                              text=True, cwd=repo, timeout=60)
        assert twin.returncode == 2 and "already running" in twin.stderr
        assert len(twin.stderr.strip().splitlines()) == 1, twin.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_a_client_killed_mid_run_leaves_the_run_to_the_workers(run, assets, redis_url, start_workers, nasq_cli, repo):
    """The run lives on the workers and in Redis: SIGKILL the waiting `nasq eval`, and the run still
    completes; `nasq status`, `nasq runs` and the report files show it."""
    import re
    import signal

    w = start_workers(redis_url, f"eval.orphan-{uuid.uuid4().hex[:6]}")
    try:
        env = {k: v for k, v in os.environ.items() if k != "NASQ_BROKER_URL"}
        client = subprocess.Popen(nasq_cli + ["eval", "--broker", redis_url, "--queue", w.queue, "--weights",
                                              assets["weights"], "--data", assets["data"], "--batch-size", "2",
                                              "--shard-size", "2", "--no-progress"],
                                  stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=repo, env=env)
        run_id = None
        for line in client.stderr:
            m = re.match(r"run (\S+): \d+ images in", line)
            if m:
                run_id = m.group(1)
                break
        assert run_id, "the client never said its run id"
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        st = run(["status", run_id, "--watch", "--interval", "0.3", "--broker", redis_url])
        assert st.returncode == 0, st.stderr
        assert "done" in st.stdout and "top-1 100.00%" in st.stdout and "images 23/23" in st.stdout
        files = re.search(r"report files: (.+)", st.stdout).group(1).split(", ")
        assert all(os.path.getsize(f) > 0 for f in files)
        runs = run(["runs", "--broker", redis_url])
        assert re.search(rf"{run_id}\s+\S+ \S+\s+done", runs.stdout), runs.stdout  # run, created, state
    finally:
        w.stop()
