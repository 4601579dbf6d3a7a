"""OpenVINO on the CPU: the OpenVINO IR built once on the build queue (``nasq build --target ov``).

Precision is always explicit: OpenVINO's own default on a CPU with bf16 units is bf16, which
moves NASNet's logits far from PyTorch's; ``fp32`` (the default here) sets
``INFERENCE_PRECISION_HINT=f32`` and matches PyTorch to ~1e-3; ``bf16`` is opt-in and its
agreement is measured (docs/PERFORMANCE.md). Threads: the worker's count. A batch of one runs
with the LATENCY hint (one stream, every thread on the image); a larger batch with the THROUGHPUT
hint told the batch size as its number of requests, so OpenVINO picks the streams for the
worker's cores (2 on 2 cores), and the batch is split into one part per stream, run at once
(on 2 cores: +7 % bf16, +2 % fp32 at batch 4, docs/PERFORMANCE.md). A part is a static shape;
the last part is padded with copies of its last image and their outputs dropped.
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
        self._config = {"INFERENCE_PRECISION_HINT": _HINT[options.precision]}
        if options.threads:
            self._config["INFERENCE_NUM_THREADS"] = str(options.threads)
        self._plans: dict[int, tuple] = {}
        self.fixed_batch = batch_size  # evaluation pads its last, short batch: one compiled shape per run
        compiled, _, _ = self._plan_for(batch_size)
        self.num_outputs = int(compiled.output(0).get_partial_shape()[1].get_length())
        self.model_info = {"artifact": os.path.abspath(path), **(model.options.get("provenance") or {})}

    def _compile(self, part: int, config: dict):
        net = self._core.read_model(self._path)
        net.reshape([part, *PREPROCESS.chw])  # static shapes run faster on the CPU plugin
        return self._core.compile_model(net, "CPU", {**self._config, **config})

    def _plan_for(self, n: int):
        """How a batch of ``n`` runs: (compiled model, one infer request per stream, images per
        request), kept for the last few sizes used."""
        if n not in self._plans:
            while len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            if n == 1:
                compiled = self._compile(1, {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"})
                streams = 1
            else:
                hint = {"PERFORMANCE_HINT": "THROUGHPUT", "PERFORMANCE_HINT_NUM_REQUESTS": str(n)}
                streams = min(n, self._streams(hint))
                compiled = self._compile(-(-n // streams), {**hint, "NUM_STREAMS": str(streams)})
            self._plans[n] = (compiled, [compiled.create_infer_request() for _ in range(streams)], -(-n // streams))
        return self._plans[n]

    def _streams(self, hint: dict) -> int:
        """The streams OpenVINO's THROUGHPUT hint picks for this CPU and thread count (a one-image
        model is compiled to ask: the choice does not depend on the shape)."""
        return int(self._compile(1, hint).get_property("NUM_STREAMS"))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        _, requests, part = self._plan_for(len(batch))
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(requests) == 1:
            return np.array(next(iter(requests[0].infer({0: x}).values())), dtype=np.float32)
        short = part * len(requests) - len(x)
        if short:
            x = np.concatenate([x, np.repeat(x[-1:], short, axis=0)])
        for i, request in enumerate(requests):
            request.start_async({0: x[i * part:(i + 1) * part]}, share_inputs=False)
        for request in requests:
            request.wait()
        out = np.concatenate([np.asarray(r.get_output_tensor(0).data) for r in requests])
        return np.array(out[:len(batch)], dtype=np.float32)

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {"openvino": ov.__version__}

    def describe_device(self) -> str:
        name = self._core.get_property("CPU", "FULL_DEVICE_NAME")
        compiled, requests, _ = self._plan_for(self.fixed_batch or 1)
        threads = compiled.get_property("INFERENCE_NUM_THREADS")
        return f"{name}, {threads} threads, {len(requests)} stream(s), OpenVINO {self.precision}"

    def close(self) -> None:
        self._plans = {}
