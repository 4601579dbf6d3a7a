"""Configuration precedence and the package layering rule."""
import ast
import os

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


def _imports(package: str) -> set[str]:
    found = set()
    for dirpath, _, files in os.walk(os.path.join(REPO, package)):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(dirpath, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        found.add(node.module.split(".")[0])
    return found


def test_layering():
    assert not _imports("nasq") & {"producer", "workers"}
    assert "workers" not in _imports("producer")
    assert "producer" not in _imports("workers")


def test_backend_registry_lists_valid_names():
    from nasq import backends
    from nasq.errors import BackendError

    with pytest.raises(BackendError, match="ais_bench, onnxruntime, torch"):
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

    assert redact("redis://:pw@head:6379/0") == "redis://***@head:6379/0"
    assert redact("rediss://user:pw@head:6380/1") == "rediss://***@head:6380/1"
    assert redact("redis://head:6379/0") == "redis://head:6379/0"
