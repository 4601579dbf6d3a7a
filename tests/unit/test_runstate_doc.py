"""docs/ARCHITECTURE.md lists every run transition as nasq.runstate.TRANSITIONS has it."""
import os
import re

from nasq.runstate import TRANSITIONS

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "ARCHITECTURE.md")


def test_architecture_lists_every_transition_with_its_states():
    rows = {}
    for line in open(DOC, encoding="utf-8"):
        m = re.match(r"\| `(\w+)` \| ([a-z, ]+) \| (\w+) \|", line)
        if m:
            rows[m.group(1)] = ({x.strip() for x in m.group(2).split(",")}, m.group(3))
    want = {name: ({str(s) for s in sources}, str(to)) for name, (sources, to) in TRANSITIONS.items()}
    assert rows == want


def test_may_and_ends_in_answer_from_the_table_for_states_their_values_and_none():
    from nasq.runstate import RunState, ends_in, may

    for name, (sources, to) in TRANSITIONS.items():
        assert ends_in(name) is to
        assert not may(name, None)
        for state in RunState:
            assert may(name, state) == may(name, state.value) == (state in sources)
    assert may("resume", "failed") and not may("resume", "done") and not may("merge", "failed")
