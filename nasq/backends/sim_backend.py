"""A SIMULATED device, for testing the queue at fleet scale on a few cores. Never a measurement.

Its logits are deterministic: two rows of a table drawn from a generator seeded by the weights
file's hash, picked by the image's index (an ``index:N`` dataset hands the index over; for real
images, a hash of a sample of the pixels stands in). It takes ``batch / rate`` seconds per batch without using the CPU, with the
rate from a table per batch size, and can fail on purpose. Options (``--sim``, comma-separated):

* ``rate=310p3`` (the seed's Ascend 310P3 table, the default) or ``rate=N`` (img/s at every size);
* ``slow=X``: X times slower;
* ``crash_after=N``: the worker process dies (SIGKILL) once it has done N images;
* ``hang_after=N``: it stops answering after N images;
* ``fail_after=N``: every batch after the first N images raises an error (a device that fails
  mid-shard: the shard fails with that reason, after reporting its progress);
* ``read_mbps=N``: the data folder is read at most at N MB/s by all of this host's simulated
  workers together (a stand-in for a shared file system's share per host; the host cache is
  local and not capped);
* ``decode=device``: JPEGs are only read on the host and handed over as bytes, as a device that
  decodes them (nvjpeg) takes them; ``decode=host`` (the default) decodes and crops them on the
  host, as every loader does.

With a dataset of real images (not ``index:N``) the worker's loaders read them, check their
bytes and keep them in the host cache, as for any backend: the data path is real, only the
device is simulated.
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
    out: dict = {"rate": "310p3", "slow": 1.0, "crash_after": None, "hang_after": None, "fail_after": None,
                 "read_mbps": None, "decode": "host"}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        key, _, value = part.partition("=")
        if key not in out or not value:
            raise BackendError(f"sim option {part!r}: expected rate=310p3|N, slow=X, crash_after=N, hang_after=N, "
                               "fail_after=N, read_mbps=N or decode=host|device")
        if key == "decode":
            if value not in ("host", "device"):
                raise BackendError(f"sim option {part!r}: decode is host or device")
            out[key] = value
            continue
        try:
            out[key] = value if (key, value) == ("rate", "310p3") else (
                float(value) if key in ("rate", "slow", "read_mbps") else int(value))
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
        # logits per image from two rows of a table drawn from the weights' seed: deterministic per
        # (weights, image) and cheap (a simulated device must leave the host's CPU to the data path)
        self._table = np.random.default_rng(self._seed).standard_normal((1024, model.num_outputs or BACKGROUND_OUTPUTS),
                                                                        dtype=np.float32)
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
        began = time.perf_counter()
        if batch.dtype.kind == "i" and batch.ndim == 2 and batch.shape[1] == 1:
            keys = [int(i) for i in batch[:, 0]]  # an index: dataset
        else:
            # a sample of each image names it (every 61st byte: a full pass costs a real loader's
            # share of the CPU, which a simulated device must not take from the data path it measures)
            keys = [zlib.crc32(np.ascontiguousarray(x).reshape(-1)[::61].tobytes()) for x in batch]
        return self._outputs(keys, began)

    def _outputs(self, keys: list[int], began: float | None = None) -> np.ndarray:
        """The simulated device's work on a batch of images named by ``keys``: its time (from
        ``began``, so that naming the images is part of it), its failures, its logits (seeded by
        the weights and each key)."""
        if self.spec["fail_after"] is not None and self._done >= self.spec["fail_after"]:
            raise BackendError(f"simulated device failure after {self._done} images (sim option fail_after)")
        spent = time.perf_counter() - began if began is not None else 0.0
        time.sleep(max(0.0, self.seconds_for(len(keys)) - spent))
        self._done += len(keys)
        if self.spec["crash_after"] is not None and self._done >= self.spec["crash_after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.spec["hang_after"] is not None and self._done >= self.spec["hang_after"]:
            while True:
                time.sleep(3600)
        t = self._table
        return np.stack([t[k % 1021] + t[(k // 1021) % 1024][::-1] for k in keys])

    def predict_u8(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)

    @property
    def decodes_jpeg(self) -> bool:
        """``decode=device``: the loaders hand over the JPEGs' bytes (``predict_encoded``)."""
        return getattr(self, "spec", {}).get("decode") == "device"

    @property
    def read_mbps(self) -> float | None:
        """``read_mbps``: the data folder's bandwidth on this host (``ReadThrottle``)."""
        return getattr(self, "spec", {}).get("read_mbps")

    def predict_encoded(self, datas: list[bytes]) -> np.ndarray:
        began = time.perf_counter()
        return self._outputs([zlib.crc32(d) for d in datas], began)

    def versions(self) -> dict[str, str]:
        return {"sim": "nasq simulator (not a measurement)"}

    def describe_device(self) -> str:
        """The simulated hardware: its rate and every option that changes its timing, so that
        devices simulated differently never share a hardware text."""
        spec, defaults = self.spec, parse_sim(None)
        shown = [f"rate {spec['rate']}"] + [f"{key} {spec[key]:g}" if isinstance(spec[key], float) else f"{key} {spec[key]}"
                                            for key in ("slow", "read_mbps", "decode", "fail_after", "crash_after",
                                                        "hang_after") if spec[key] != defaults[key]]
        return f"SIMULATED ({', '.join(shown)}, not a measurement)"
