"""Each concern lives in one module: every message nasq sends is made in nasq.queue.messages,
and only nasq.queue.transport reaches into Celery's and kombu's objects beyond their documented
calls."""
import pathlib
import re

import nasq

ROOT = pathlib.Path(nasq.__file__).parent


def lines_matching(pattern: str, *, outside: set[str]) -> list[str]:
    rx = re.compile(pattern)
    return [f"{p.relative_to(ROOT)}:{n}" for p in sorted(ROOT.rglob("*.py")) if str(p.relative_to(ROOT)) not in outside
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if rx.search(line) and not line.lstrip().startswith("#")]


def test_every_message_is_made_in_messages():
    made = r"(?<!inspect)\.signature\(|\bsend_task\(|\bTASK_[A-Z_]+\b"  # inspect.signature is not a message
    assert lines_matching(made, outside={"queue/messages.py", "wire.py"}) == []
    assert lines_matching(r"\.signature\(", outside=set()) != []  # the pattern does find them


def test_only_transport_patches_celery_internals():
    internals = r"producer_or_acquire|subscribe_on_send|subscribed_to|\.batch\(max_size"
    assert lines_matching(internals, outside={"queue/transport.py"}) == []
    assert lines_matching(internals, outside=set()) != []


def _value_literals(path: pathlib.Path, vocabulary: set[str]) -> list[str]:
    """String literals of ``vocabulary`` used as values: compared (``==``, ``!=``, ``in (...)``),
    returned, assigned, passed by keyword, a dict's value or a transition's name; never a key
    (``d["x"]``, ``d.get("x")``, ``{"x": ...}``) or a Redis key's part."""
    import io
    import tokenize

    toks = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    out = []
    for i, t in enumerate(toks):
        if t.type != tokenize.STRING or not re.fullmatch(r"[\"'][a-z-]+[\"']", t.string) \
                or t.string[1:-1] not in vocabulary:
            continue
        before = [x.string for x in toks[max(0, i - 3):i]]
        after = toks[i + 1].string if i + 1 < len(toks) else ""
        compared = before[-1:] in (["=="], ["!="]) or after in ("==", "!=")
        valued = before[-1:] in (["return"], ["="]) or (before[-1:] == [":"] and after in (",", "}", "if"))
        at_in = i - 2 if before[-2:] == ["in", "("] else i - 3 if before[-3:-1] == ["in", "("] else None
        among = at_in is not None and not any(x.string == "for" and x.start[0] == toks[at_in].start[0]
                                              for x in toks[max(0, at_in - 12):at_in])  # not a loop over key names
        moved = before[-2:-1] in (["may"], ["transition"], ["ends_in"]) or (before[-1:] == [","] and toks[i - 3].string
                                                                              in ("transition", "may"))
        if compared or valued or among or moved:
            out.append(f"{path.relative_to(ROOT.parent)}:{t.start[0]}: {t.string}")
    return out


def test_run_states_shard_outcomes_and_transitions_are_named_only_in_runstate():
    """A run's states and transitions, how a shard's copy ends, what the store's scripts answer
    and what an unfinished shard is doing are ``nasq.runstate``'s enums everywhere else (and
    the scripts are written with their names: ``nasq.queue.scripts``)."""
    from nasq import runstate

    vocabulary = {m.value for kind in (runstate.RunState, runstate.Transition, runstate.ShardStatus,
                                       runstate.Outcome, runstate.Redispatch, runstate.Unfinished) for m in kind}
    vocabulary -= {"state"}  # the TRANSITION script's answer, and the run record's field everywhere
    files = [p for root in (ROOT, ROOT.parent / "workers", ROOT.parent / "producer") for p in sorted(root.rglob("*.py"))
             if p.name != "runstate.py"]
    other = {  # the same words in another vocabulary
        'nasq/files.py: "missing"',  # a file that verify_files did not find
        'nasq/api/sweeps.py: "done"',  # a sweep's state (its points are all measured)
    }
    hits = [hit for p in files for hit in _value_literals(p, vocabulary)]
    assert [h for h in hits if re.sub(r":\d+:", ":", h) not in other] == []
    # the scan finds them where they are
    assert _value_literals(ROOT / "runstate.py", vocabulary)
    from nasq.queue import scripts

    for name in ("CLAIM", "TICK", "COMMIT", "FAIL", "TRANSITION", "REDISPATCH", "RENEW"):
        text = getattr(scripts, name)
        assert "$" not in text.replace("%d+$'", ""), name  # every name was put in
    raw = (ROOT / "queue" / "scripts.py").read_text(encoding="utf-8")
    spelled = {m.value for m in runstate.Outcome} - {"state"}
    assert [v for v in spelled if f"'{v}'" in raw] == []  # the scripts' source spells none
