"""OpenVINO on the CPU: the OpenVINO IR built once on the build queue (``nasq build --target ov``).

Precision is always explicit: OpenVINO's own default on a CPU with bf16 units is bf16, which
moves NASNet's logits far from PyTorch's; ``fp32`` (the default here) sets
``INFERENCE_PRECISION_HINT=f32`` and matches PyTorch to ~1e-3; ``bf16`` is opt-in and its
agreement is measured (docs/PERFORMANCE.md). The LATENCY hint with one stream is used (on few
cores the THROUGHPUT hint's streams are slower), with the worker's thread count.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..model.spec import PREPROCESS, ModelRef
from .base import Backend

_HINT = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoBackend(Backend):
    name = "openvino"
    artifact_suffixes = (".xml",)
    precisions = ("fp32", "bf16")
    #: the build target whose artifact this backend runs (a checkpoint is built to it first)
    build_target = "ov"

    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        import openvino as ov

        self.check_options(options)
        if not self.device.startswith("cpu"):
            raise BackendError(f"openvino backend: device {self.device} is not supported yet (cpu only)")
        path = self._model_file(model.weights, "model.xml", "an OpenVINO IR (.xml)")
        core = ov.Core()
        if options.precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendError("openvino backend: this CPU has no bf16 support (OPTIMIZATION_CAPABILITIES); use fp32")
        self._core, self._path, self.precision = core, path, options.precision
        self._config = {"INFERENCE_PRECISION_HINT": _HINT[options.precision], "PERFORMANCE_HINT": "LATENCY",
                        "NUM_STREAMS": "1"}
        if options.threads:
            self._config["INFERENCE_NUM_THREADS"] = str(options.threads)
        self._requests: dict[int, tuple] = {}
        self.fixed_batch = batch_size  # evaluation pads its last, short batch: one compiled shape per run
        compiled, _ = self._request_for(batch_size)
        self.num_outputs = int(compiled.output(0).get_partial_shape()[1].get_length())
        self.model_info = {"artifact": os.path.abspath(path), **(model.options.get("provenance") or {})}

    def _request_for(self, n: int):
        """The model compiled for a static batch of ``n`` (static shapes run faster on the CPU
        plugin), kept for the last few sizes used."""
        if n not in self._requests:
            while len(self._requests) >= 4:
                self._requests.pop(next(iter(self._requests)))
            net = self._core.read_model(self._path)
            net.reshape([n, *PREPROCESS.chw])
            compiled = self._core.compile_model(net, "CPU", self._config)
            self._requests[n] = (compiled, compiled.create_infer_request())
        return self._requests[n]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        _, request = self._request_for(len(batch))
        out = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {"openvino": ov.__version__}

    def describe_device(self) -> str:
        name = self._core.get_property("CPU", "FULL_DEVICE_NAME")
        compiled, _ = self._request_for(self.fixed_batch or 1)
        threads = compiled.get_property("INFERENCE_NUM_THREADS")
        return f"{name}, {threads} threads, OpenVINO {self.precision}"

    def close(self) -> None:
        self._requests = {}
