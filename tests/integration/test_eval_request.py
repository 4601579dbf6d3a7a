"""An evaluation option is declared once (``nasq.request.EvalRequest``): a field added there is a
flag of ``nasq eval`` (and ``python -m producer``), a keyword of the API, part of the request the
run's manifest records, and a flag of the command that reruns the run."""
import dataclasses
import uuid

import pytest

from nasq import request as rq
from nasq.config import Settings


@dataclasses.dataclass(frozen=True)
class WithWarmup(rq.EvalRequest):
    warmup_batches: int | None = dataclasses.field(default=None, metadata=rq._arg(
        "batches run before the timed ones", type=rq.int_in(0, 100)))


def test_an_option_declared_once_is_a_flag_a_keyword_in_the_manifest_and_in_the_rerun(monkeypatch, assets, redis_url,
                                                                                         capsys):
    import inspect

    from nasq.api import cancel, submit_evaluation
    from nasq.cli import build_parser
    from nasq.queue.store import RunStore

    monkeypatch.setattr(rq, "EvalRequest", WithWarmup)
    # the flag, in nasq eval --help and parsed back into the request
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    shown = capsys.readouterr().out
    assert "--warmup-batches" in shown and "batches run before the timed ones" in shown
    args = parser.parse_args(["eval", "--weights", assets["weights"], "--data", assets["data"], "--warmup-batches", "3"])
    assert rq.request_from_args(args).warmup_batches == 3
    # the keyword, in the API's signature, taken by the same submission code
    submit = rq.takes_request()(submit_evaluation.__wrapped__)
    assert inspect.signature(submit).parameters["warmup_batches"].default is None
    settings = Settings(broker_url=redis_url)
    handle = submit(weights=assets["weights"], data=assets["data"], labels=assets["labels"], backend="sim",
                    warmup_batches=3, queue=f"eval.req-{uuid.uuid4().hex[:6]}", settings=settings, log=lambda *_: None)
    try:
        manifest = RunStore(redis_url).runs.manifest(handle.run_id)
        assert manifest.request["warmup_batches"] == 3  # the manifest's record of the request
        assert manifest.request["batch_size"] == rq.EvalRequest.__dataclass_fields__["batch_size"].default
        command = list(manifest.command)  # the rerun command
        assert command[command.index("--warmup-batches") + 1] == "3"
        assert command[command.index("--weights") + 1] == assets["weights"]
        # and that command parses back into the same request
        again = rq.request_from_args(parser.parse_args(command[1:]))
        assert again.warmup_batches == 3 and again.backend == "sim" and again.labels == manifest.request["labels"]
    finally:
        handle.close()
        cancel(handle.run_id, settings=settings, log=lambda *_: None)
