"""An evaluation's default batch size is written in one place (nasq.config.DEFAULT_BATCH_SIZE):
every signature and flag takes it from there."""
import pathlib
import re

import nasq
from nasq.config import DEFAULT_BATCH_SIZE

ROOT = pathlib.Path(nasq.__file__).parent


def test_the_default_batch_size_is_written_once():
    # a signature's or a flag's own default, or the default's value passed by hand
    literal = re.compile(rf"batch_size\s*:\s*int\s*=\s*\d|--batch-size\".*default=\d|batch_size={DEFAULT_BATCH_SIZE}\b")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted(ROOT.rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if literal.search(line) and not line.lstrip().startswith(("#", ">>>"))]
    assert found == []
    assert (ROOT / "config.py").read_text(encoding="utf-8").count(f"DEFAULT_BATCH_SIZE = {DEFAULT_BATCH_SIZE}") == 1


def test_eval_help_and_api_take_the_one_default():
    import inspect

    from nasq.api import evaluate, submit_evaluation
    from nasq.cli import build_parser

    for fn in (evaluate, submit_evaluation):
        assert inspect.signature(fn).parameters["batch_size"].default == DEFAULT_BATCH_SIZE
    args = build_parser().parse_args(["eval", "--weights", "w.pth", "--data", "d"])
    assert args.batch_size == DEFAULT_BATCH_SIZE
