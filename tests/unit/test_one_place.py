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
