"""A password-protected Redis works end to end (broker, results, run records)."""
import subprocess

import pytest
import redis

from nasq.queue.redis_server import free_port, redis_binary, wait_for_redis

def test_eval_through_a_password_protected_redis(eval_through, tmp_path):
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "s3cret pass", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:s3cret%20pass@127.0.0.1:{port}/0"
    try:
        assert wait_for_redis(url, proc), "the password-protected redis-server did not start"
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).get("x")  # closed without the password
        report = eval_through(url)
        assert report["images"] == 20 and report["top1"] == 100.0
    finally:
        proc.terminate()
        proc.wait(10)
