"""OpenVINO on the CPU: the OpenVINO IR built once on the build queue (``nasq build --target ov``).

Precision is always explicit: OpenVINO's own default on a CPU with bf16 units is bf16, which
moves NASNet's logits far from PyTorch's; ``fp32`` (the default here) sets
``INFERENCE_PRECISION_HINT=f32`` and matches PyTorch to ~1e-3; ``bf16`` is opt-in and its
agreement is measured (docs/PERFORMANCE.md). Threads: the worker's count. Streams: as many
as OpenVINO's THROUGHPUT hint picks for the worker's cores (2 on 2 cores), or the largest divisor
of the batch size below that; the batch is split into equal parts, one per stream, run at once
(on 2 cores, batch 4: +1 to +7 % bf16, +2 % fp32 in two A/Bs, docs/PERFORMANCE.md). One stream
(a batch of one, or a prime batch above the cap) runs with the LATENCY hint, every thread on the
batch.
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
    runtime = ("openvino", "openvino")
    artifact_suffixes = (".xml",)
    precisions = ("fp32", "bf16")
    #: the build target whose artifact this backend runs (a checkpoint is built to it first)
    build_target = "ov"
    #: the short last batch is padded to the run's batch size (one compiled shape per run), so a
    #: worker loads again for another batch size rather than pad every batch of a smaller run
    load_per_batch_size = True

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
        self._streams_cap: int | None = None
        self._last_batch: int | None = None
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
        request), kept for the last few sizes used. The streams: the largest divisor of ``n`` not
        above what OpenVINO's THROUGHPUT hint picks, so every part is full (a padded part would
        make an odd batch slower than one stream: 3 images on 2 streams cost 4)."""
        if n not in self._plans:
            while len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            streams = max((d for d in range(1, min(n, self._max_streams()) + 1) if n % d == 0), default=1)
            if streams == 1:
                compiled = self._compile(n, {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"})
            else:
                compiled = self._compile(n // streams, {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)})
            self._plans[n] = (compiled, [compiled.create_infer_request() for _ in range(streams)], n // streams)
        return self._plans[n]

    def _max_streams(self) -> int:
        """The streams OpenVINO's THROUGHPUT hint picks for this CPU and thread count, asked once
        (by compiling a one-image model; its memory-pressure estimate may differ a little from a
        larger batch's, which only matters as a cap here)."""
        if self._streams_cap is None:
            self._streams_cap = int(self._compile(1, {"PERFORMANCE_HINT": "THROUGHPUT"}).get_property("NUM_STREAMS"))
        return self._streams_cap

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if not len(batch):
            return np.zeros((0, self.num_outputs), dtype=np.float32)
        self._last_batch = len(batch)
        _, requests, part = self._plan_for(len(batch))
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(requests) == 1:
            return np.array(next(iter(requests[0].infer({0: x}).values())), dtype=np.float32)
        started = []
        try:
            for i, request in enumerate(requests):
                request.start_async({0: x[i * part:(i + 1) * part]}, share_inputs=False)
                started.append(request)
        finally:  # never leave a request running (a busy request fails the next call)
            errors = []
            for request in started:
                try:
                    request.wait()
                except Exception as e:  # noqa: BLE001 - the first one is raised below
                    errors.append(e)
        if errors:
            raise errors[0]
        return np.concatenate([np.array(r.get_output_tensor(0).data, dtype=np.float32) for r in requests])

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {"openvino": ov.__version__}

    def describe_device(self) -> str:
        compiled, requests, _ = self._plan_for(self._last_batch or self.fixed_batch or 1)  # the batch last run
        threads = compiled.get_property("INFERENCE_NUM_THREADS")
        return f"OpenVINO {self.precision}, {threads} threads, {len(requests)} stream(s)"

    def environment(self) -> dict:
        return {"cpu": self._core.get_property("CPU", "FULL_DEVICE_NAME")}

    def close(self) -> None:
        self._plans = {}
