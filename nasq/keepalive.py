"""Keeping something alive while a long step runs: a lease, a lock."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

log = logging.getLogger("nasq")


@contextmanager
def every(interval_s: float, fn, *, what: str):
    """Call ``fn()`` every ``interval_s`` seconds in a daemon thread while the body runs (the
    body keeps the main thread busy). A call that raises is logged; the next one tries again."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval_s):
            try:
                fn()
            except Exception:  # noqa: BLE001 - a broker blip: the next call tries again
                log.warning("could not renew %s", what, exc_info=True)

    keeper = threading.Thread(target=loop, daemon=True, name=f"keep {what}")
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
