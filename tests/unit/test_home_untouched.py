"""The tests never write into the user's own cache: the session runs with HOME and the XDG folders
in a temporary folder (tests/conftest.py), and fails if ~/.cache/nasq changed during it."""
from __future__ import annotations

import os
import subprocess
import sys

from nasq.config import Settings, cache_dir


def test_every_default_path_is_the_sessions_own():
    home = os.environ["NASQ_TEST_HOME"]
    real = os.environ["NASQ_TEST_REAL_CACHE"]
    s = Settings()
    for path in (cache_dir(), s.report_dir, s.artifact_dir, s.work_dir, s.host_cache_dir):
        assert path.startswith(home + os.sep), path
        assert not path.startswith(real), path
    assert os.path.expanduser("~") == home


def _session(tmp_path, body: str) -> subprocess.CompletedProcess:
    """A pytest session with the project's conftest whose "real" cache is a folder of tmp_path."""
    fake = tmp_path / "real-cache" / "nasq"
    (fake / "reports").mkdir(parents=True, exist_ok=True)
    (fake / "reports" / "runs.sqlite").write_bytes(b"history")
    (tmp_path / "test_one.py").write_text(body)
    env = dict(os.environ, NASQ_TEST_REAL_CACHE=str(fake),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(tmp_path / "test_one.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_session_that_writes_into_the_users_cache_fails(tmp_path):
    clean = _session(tmp_path, "def test_nothing():\n    pass\n")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    dirty = _session(tmp_path, "import os\n\ndef test_writes():\n"
                               "    with open(os.path.join(os.environ['NASQ_TEST_REAL_CACHE'], 'reports', 'runs.sqlite'), 'ab') as f:\n"
                               "        f.write(b'a run')\n")
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    assert "1 passed" in dirty.stdout and "the tests changed the user's" in dirty.stdout
    assert "reports/runs.sqlite" in dirty.stdout
