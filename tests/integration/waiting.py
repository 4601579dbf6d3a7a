"""What the integration tests share to wait on things: a condition polled until it holds, a
client waiting on a run in a thread (what it said, and when), the weights of simulated devices."""
from __future__ import annotations

import os
import threading
import time


def until(condition, timeout: float, what: str, every: float = 0.05):
    """``condition()``'s first truthy value within ``timeout`` seconds, else AssertionError."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


class Waiter(threading.Thread):
    """A client waiting on a run in a thread: its result, its error, what it said (``said``) and
    when (``first``)."""

    def __init__(self, handle, timeout: float = 240):
        super().__init__(daemon=True)
        self.handle, self.timeout, self.result, self.error = handle, timeout, None, None
        self.said: list[str] = []
        self.times: list[float] = []
        self.start()

    def _log(self, line: str) -> None:
        self.times.append(time.time())
        self.said.append(line)

    def run(self):
        try:
            self.result = self.handle.wait(progress=False, timeout=self.timeout, log=self._log)
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e

    def first(self, text: str) -> float | None:
        """When the client first said something holding ``text`` (None: not yet)."""
        return next((t for t, line in zip(self.times, self.said) if text in line), None)


def sim_weights(tmp_path) -> str:
    """Weights for the SIMULATED backend (any bytes: they seed its outputs)."""
    path = tmp_path / "fleet.sim"
    path.write_bytes(os.urandom(64))
    return str(path)


def sim_reference(weights: str, images: int, batch_size: int) -> dict:
    """What an undisturbed run of ``index:<images>`` on SIMULATED devices predicts, computed in
    this process at a rate that takes no time (the simulator's outputs depend on the weights and
    the image's index only)."""
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.data import open_source
    from nasq.inference.evaluate import evaluate_range
    from nasq.model.spec import ModelRef

    b = backends.create("sim", "cpu")
    b.load(ModelRef(weights), batch_size=batch_size, options=BackendOptions(sim="rate=10000000"))
    return evaluate_range(open_source(f"index:{images}"), b, 0, images, batch_size=batch_size)
