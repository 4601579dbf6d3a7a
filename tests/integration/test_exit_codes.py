"""The exit-code table (``nasq --help``, nasq.cli.exits) for each class of ending: a bad flag,
no such run, a failed run, a cancelled run (in test_readable_numbers and test_history), an
unreachable broker, a reader that closed the pipe."""
import os
import subprocess

from nasq.cli import exits
from nasq.config import Settings


def test_every_class_of_ending_has_its_code(redis_url, start_workers, tmp_path, cli, nasq_cli, repo):
    help_text = cli(["--help"]).stdout
    assert all(f"  {code}  " in help_text for code, _ in exits.TABLE) and "%%" not in help_text
    assert cli(["runs", "--limit", "0"]).returncode == exits.USAGE                              # a bad flag
    missing = cli(["status", "no-such-run"], broker=redis_url)
    assert missing.returncode == exits.USAGE and "no run 'no-such-run'" in missing.stderr     # no such run
    down = cli(["status", "x"], broker="redis://127.0.0.1:1/0")                              # unreachable broker
    assert down.returncode == exits.BROKER and len(down.stderr.strip().splitlines()) == 1, down.stderr
    # a failed run: a device that fails from its first batch
    weights = tmp_path / "w.sim"
    weights.write_bytes(os.urandom(32))
    w = start_workers(redis_url, backend="sim", sim="rate=400,fail_after=0", settings=Settings(report_dir=str(tmp_path)))
    failed = cli(["eval", "--backend", "sim", "--weights", str(weights), "--data", "index:8", "-b", "4", "--queue",
                  w.queue, "--no-progress"], broker=redis_url, report_dir=tmp_path)
    assert failed.returncode == exits.RUN_FAILED, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert "simulated device failure" in last and "0 of 8 images evaluated" in last and "report: " in last
    # a reader that closed the pipe (`nasq runs --json | head`): quiet, 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")} | {"NASQ_REPORT_DIR": str(tmp_path)}
    p = subprocess.Popen(nasq_cli + ["runs", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=repo,
                         env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == exits.OK and err == "", err
