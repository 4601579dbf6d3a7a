"""A SIMULATED device, for testing the queue at fleet scale on a few cores. Never a measurement.

Its logits are deterministic: drawn from a generator seeded by the weights file's hash and the
image's index (an ``index:N`` dataset hands the index over; for real images, a hash of the
pixels stands in). It takes ``batch / rate`` seconds per batch without using the CPU, with the
rate from a table per batch size, and can fail on purpose. Options (``--sim``, comma-separated):

* ``rate=310p3`` (the seed's Ascend 310P3 table, the default) or ``rate=N`` (img/s at every size);
* ``slow=X``: X times slower;
* ``crash_after=N``: the worker process dies (SIGKILL) once it has done N images;
* ``hang_after=N``: it stops answering after N images;
* ``fail_after=N``: every batch after the first N images raises an error (a device that fails
  mid-shard: the shard fails with that reason, after reporting its progress).
"""
from __future__ import annotations

import os
import signal
import time
import zlib

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..files import file_digest
from ..model.spec import BACKGROUND_OUTPUTS, ModelRef
from .base import Backend

#: the seed's published 310P3 throughput (img/s) by batch size
SEED_310P3 = {1: 153.3, 4: 175.7, 8: 162.6, 16: 146.5, 32: 135.8, 64: 113.5}


def parse_sim(spec: str | None) -> dict:
    """``"rate=20,crash_after=100"`` -> {"rate": 20.0, "crash_after": 100}; refuses unknown keys."""
    out: dict = {"rate": "310p3", "slow": 1.0, "crash_after": None, "hang_after": None, "fail_after": None}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        key, _, value = part.partition("=")
        if key not in out or not value:
            raise BackendError(f"sim option {part!r}: expected rate=310p3|N, slow=X, crash_after=N, hang_after=N or "
                               "fail_after=N")
        try:
            out[key] = value if (key, value) == ("rate", "310p3") else (float(value) if key in ("rate", "slow")
                                                                          else int(value))
        except ValueError:
            raise BackendError(f"sim option {part!r}: {value!r} is not a number") from None
    return out


class SimBackend(Backend):
    name = "sim"
    artifact_suffixes = (".pth", ".pt", ".sim")
    device_kinds = ("cpu", "cuda", "npu")

    @classmethod
    def check_device(cls, device: str) -> None:
        """A SIMULATED device is always there (that is the point: a fleet on two cores)."""
        from ..config import parse_device

        try:
            parse_device(device)
        except ValueError as e:
            raise BackendError(str(e)) from None

    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        self.check_options(options)
        if not os.path.isfile(model.weights):
            raise BackendError(f"sim backend: weights {model.weights!r} do not exist (any file will do)")
        self.spec = parse_sim(options.sim)
        self._seed = int(file_digest(model.weights)[:15], 16)
        self.num_outputs = model.num_outputs or BACKGROUND_OUTPUTS
        self._done = 0
        self.model_info = {"weights": os.path.abspath(model.weights), "sha256": file_digest(model.weights),
                           "arch": "SIMULATED", "num_outputs": self.num_outputs, "published": False}

    def seconds_for(self, n: int) -> float:
        """Simulated device time of a batch of ``n``."""
        rate = self.spec["rate"]
        if rate == "310p3":
            rate = SEED_310P3[max((b for b in SEED_310P3 if b <= n), default=1)]
        return n / float(rate) * self.spec["slow"]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype.kind == "i" and batch.ndim == 2 and batch.shape[1] == 1:
            keys = [int(i) for i in batch[:, 0]]  # an index: dataset
        else:
            keys = [zlib.crc32(np.ascontiguousarray(x).tobytes()) for x in batch]
        if self.spec["fail_after"] is not None and self._done >= self.spec["fail_after"]:
            raise BackendError(f"simulated device failure after {self._done} images (sim option fail_after)")
        time.sleep(self.seconds_for(len(batch)))
        self._done += len(batch)
        if self.spec["crash_after"] is not None and self._done >= self.spec["crash_after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.spec["hang_after"] is not None and self._done >= self.spec["hang_after"]:
            while True:
                time.sleep(3600)
        return np.stack([np.random.default_rng([self._seed, k]).standard_normal(self.num_outputs, dtype=np.float32)
                         for k in keys])

    def predict_u8(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)

    def versions(self) -> dict[str, str]:
        return {"sim": "nasq simulator (not a measurement)"}

    def describe_device(self) -> str:
        return f"SIMULATED (rate {self.spec['rate']}, not a measurement)"
