"""A password-protected Redis works end to end (broker, results, run records)."""
import subprocess
import time
import uuid

import pytest
import redis

from conftest import Workers
from nasq.api import evaluate
from nasq.config import Settings
from nasq.redis_server import free_port, redis_binary

pytestmark = pytest.mark.slow


def test_eval_through_a_password_protected_redis(assets, tmp_path):
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "s3cret pass", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:s3cret%20pass@127.0.0.1:{port}/0"
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).get("x")  # closed without the password
        w = Workers(url, f"eval.auth-{uuid.uuid4().hex[:6]}", str(tmp_path))
        w.start(1)
        try:
            res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                           queue=w.queue, settings=Settings(broker_url=url, report_dir=str(tmp_path / "rep")),
                           progress=False, log=lambda *_: None)
        finally:
            w.stop()
        assert res.report["images"] == 20 and res.report["top1"] == 100.0
    finally:
        proc.terminate()
        proc.wait(10)
