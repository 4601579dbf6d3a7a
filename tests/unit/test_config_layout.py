"""Configuration precedence, the layering contracts and the registries."""
import os
import shutil
import subprocess
import sys

import pytest

from nasq.config import load_settings
from nasq.errors import NasqError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "nasq.toml"
    cfg.write_text('[nasq]\nbroker_url = "redis://file:6379/0"\nmax_attempts = 5\n')
    monkeypatch.setenv("NASQ_CONFIG", str(cfg))
    monkeypatch.delenv("NASQ_BROKER_URL", raising=False)
    s = load_settings()
    assert s.broker_url == "redis://file:6379/0" and s.max_attempts == 5
    monkeypatch.setenv("NASQ_BROKER_URL", "redis://env:6379/0")
    assert load_settings().broker_url == "redis://env:6379/0"
    assert load_settings(broker_url="redis://flag:6379/0").broker_url == "redis://flag:6379/0"
    assert load_settings(broker_url=None).broker_url == "redis://env:6379/0"
    monkeypatch.setenv("NASQ_MAX_ATTEMPTS", "x")
    with pytest.raises(NasqError, match="integer"):
        load_settings()
    cfg.write_text('[nasq]\nbrokr_url = "x"\n')
    monkeypatch.delenv("NASQ_MAX_ATTEMPTS")
    with pytest.raises(NasqError, match="unknown settings"):
        load_settings()


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: nasq never imports producer/workers, they never
    import each other, nasq's packages are layered, backends know nothing of the queue, no cycles."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed: pip install -e '.[test]'"
    p = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 broken" in p.stdout


def test_no_task_or_backend_reads_nasq_environment():
    """Worker settings travel in WorkerConfig and BackendOptions, never through NASQ_* variables
    (only the flag parser, workers/__main__.py, names them, in its help)."""
    places = [os.path.join(REPO, "nasq", "backends"), os.path.join(REPO, "workers")]
    found = [f"{d}/{f}" for d in places for f in os.listdir(d) if f.endswith(".py") and f != "__main__.py"
             and "NASQ_" in open(os.path.join(d, f)).read()]
    assert found == []


def test_backend_registry_lists_valid_names():
    from nasq import backends
    from nasq.errors import BackendError

    with pytest.raises(BackendError, match="ais_bench, onnxruntime, openvino, sim, torch"):
        backends.create("tensorflow", "cpu")


def test_pinning_env():
    from workers.pinning import pinning_env

    assert pinning_env("cuda:3") == ({"CUDA_VISIBLE_DEVICES": "3"}, "cuda:0")
    assert pinning_env("npu:1") == ({"ASCEND_RT_VISIBLE_DEVICES": "1"}, "npu:0")
    env, local = pinning_env("cpu", threads=2)
    assert local == "cpu" and env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"
    with pytest.raises(ValueError):
        pinning_env("gpu0")


def test_redact_hides_passwords():
    from nasq.config import redact

    assert redact("redis://:pw@head:6379/0") == "redis://:**@head:6379/0"
    assert redact("rediss://user:pw@head:6380/1") == "rediss://user:**@head:6380/1"
    assert redact("redis://head:6379/0") == "redis://head:6379/0"
    assert "s3cret" not in redact("rediss://head:6380/0?ssl_cert_reqs=required&password=s3cret")
    assert redact(None) is None


def test_every_worker_option_has_one_home(tmp_path):
    """Each option declared in ``BackendOptions`` (with flag metadata) is a flag of `nasq worker`,
    travels in a local worker's argv, and comes back from that argv into the worker's
    configuration and the options its backend gets: one declaration, no copy to keep in step."""
    import dataclasses

    from nasq.config import BackendOptions, Settings, WorkerConfig
    from nasq.flags import OPTION_FIELDS, flag_of, options_from
    from nasq.queue.local import WorkerSpec
    from workers.__main__ import build_parser

    parser = build_parser()
    text = parser.format_help()
    samples = {"precision": "bf16", "threads": 3, "compile": "default", "cuda_graphs": True, "kernels": "triton",
               "device_decode": True, "decode_threads": 5, "sim": "rate=7"}
    assert {f.name for f in OPTION_FIELDS} == set(samples), "a new option needs a sample value here"
    for f in OPTION_FIELDS:
        assert flag_of(f.name) in text, f.name
        options = dataclasses.replace(BackendOptions(), **{f.name: samples[f.name]})
        argv = WorkerSpec(device="cpu", options=options).argv("w@h", "redis://x/0")
        assert flag_of(f.name) in argv, f.name
        args, _ = parser.parse_known_args(argv[argv.index("workers") + 1:])
        config = WorkerConfig(settings=Settings(artifact_dir=str(tmp_path)), options=options_from(args))
        assert getattr(config.backend_options(), f.name) == samples[f.name], f.name


def test_no_module_is_a_catch_all():
    """No file of nasq/, workers/ or producer/ over 450 lines: each holds one job."""
    long = []
    for top in ("nasq", "workers", "producer"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(folder, f)) as fh:
                        n = sum(1 for _ in fh)
                    if n > 450:
                        long.append(f"{os.path.relpath(os.path.join(folder, f), REPO)}: {n}")
    assert long == []
