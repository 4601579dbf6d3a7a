"""nasq.config is the only module that reads NASQ_* environment variables (its docstring says so)."""
import pathlib
import re

import nasq

ROOT = pathlib.Path(nasq.__file__).parent


def test_only_config_reads_nasq_variables():
    read = re.compile(r"""environ(\.get\(|\[|\.pop\(|\.setdefault\()\s*f?["']NASQ_|getenv\(\s*f?["']NASQ_""")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted(ROOT.rglob("*.py")) if p.name != "config.py"
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if read.search(line)]
    assert found == []
    assert read.search((ROOT / "config.py").read_text(encoding="utf-8"))  # the pattern does find a read
