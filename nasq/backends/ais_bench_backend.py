"""Ascend OM models through ais_bench's ``InferSession``.

Thin and documented, because no Ascend NPU or CANN toolkit is available where nasq is
developed: this adapter is not exercised by the test suite. What it relies on (ais_bench
interface API, https://gitee.com/ascend/tools, ``ais_bench.infer.interface``):

* ``InferSession(device_id, model_path)`` loads an ``.om`` on NPU ``device_id``;
* ``session.infer([batch], mode="static")`` returns a list of numpy outputs
  (``mode="dymbatch"`` for models compiled with ``--dynamic_batch_size`` gears);
* ``session.free_device()`` releases it.

The worker pins the NPU with ``ASCEND_RT_VISIBLE_DEVICES`` before this module is imported,
so inside the process the device is always ``npu:0``. An OM compiled for a fixed batch
size gets padded batches (``fixed_batch``), as ais_bench itself does.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..model.spec import ModelRef
from .base import Backend


class AisBenchBackend(Backend):
    name = "ais_bench"
    artifact_suffixes = (".om",)

    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        self.check_options(options)
        try:
            from ais_bench.infer.interface import InferSession
        except ImportError:
            raise BackendError("the ais_bench backend needs Ascend's ais_bench and aclruntime packages "
                               "(install the wheels from the ais_bench release on a CANN host)") from None
        kind, _, index = self.device.partition(":")
        if kind != "npu":
            raise BackendError(f"ais_bench runs on npu:N, not {self.device!r}")
        if not model.weights.endswith(".om") or not os.path.isfile(model.weights):
            raise BackendError(f"ais_bench needs a compiled .om model, got {model.weights!r} "
                               "(build one with `nasq build --target om`)")
        self._sess = InferSession(int(index or 0), model.weights)
        shape = self._sess.get_inputs()[0].shape
        self.fixed_batch = int(shape[0]) if int(shape[0]) > 0 else None
        self._mode = "static" if self.fixed_batch else "dymbatch"
        self.model_info = {"artifact": os.path.abspath(model.weights)}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = self._sess.infer([np.ascontiguousarray(batch, dtype=np.float32)], mode=self._mode)[0]
        out = np.asarray(out, dtype=np.float32).reshape(len(batch), -1)
        self.num_outputs = out.shape[1]
        return out

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"ais_bench": version("ais_bench")}
        except PackageNotFoundError:
            return {"ais_bench": "unknown"}

    def close(self) -> None:
        if getattr(self, "_sess", None) is not None:
            self._sess.free_device()
            self._sess = None
