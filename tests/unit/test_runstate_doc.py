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
