"""A password-protected Redis works end to end (broker, results, run records)."""
from urllib.parse import urlsplit

import pytest
import redis

from nasq.queue.redis_server import spawn_redis, stop_process


def test_eval_through_a_password_protected_redis(eval_through, tmp_path):
    proc, url = spawn_redis(["--save", "", "--appendonly", "no", "--requirepass", "s3cret pass", "--dir",
                             str(tmp_path)], password="s3cret pass")
    port = urlsplit(url).port
    try:
        assert url.startswith("redis://:s3cret%20pass@")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).get("x")  # closed without the password
        report = eval_through(url)
        assert report.images == 20 and report.top1 == 100.0
    finally:
        stop_process(proc)


def test_a_redis_started_on_a_taken_port_is_not_mistaken_for_the_one_there(tmp_path):
    """Two test processes may draw the same free port: the second server cannot bind it and exits,
    and the first server's answer must not pass for it (it would vanish when its owner stops it)."""
    import subprocess

    from nasq.queue.redis_server import redis_binary, wait_for_redis

    first, url = spawn_redis(["--save", "", "--appendonly", "no", "--dir", str(tmp_path)])
    try:
        second = subprocess.Popen([redis_binary(), "--port", str(urlsplit(url).port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_redis(url, second) is False  # the port answers, but not from `second`
        assert second.wait(10) != 0
        assert wait_for_redis(url, first) is True
    finally:
        stop_process(first)
