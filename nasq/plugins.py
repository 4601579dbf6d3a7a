"""Components that build on nasq, found through the ``nasq.components`` entry points.

nasq never imports ``producer`` or ``workers``: the producer registers itself as the
``producer`` component (pyproject.toml), and workers run as separate processes
(``python -m workers``).
"""
from __future__ import annotations

from importlib.metadata import entry_points

from .errors import NasqError


def component(name: str):
    eps = entry_points(group="nasq.components", name=name)
    for ep in eps:
        return ep.load()
    raise NasqError(f"nasq component {name!r} is not installed: reinstall nasq (`pip install -e .` in the repo)")
