"""ONNX Runtime: CPU, and the CUDA, TensorRT or CANN providers when the installed build has them."""
from __future__ import annotations

import os

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..model.spec import ModelRef
from .base import Backend


def _providers(device: str, available: list[str]) -> list:
    kind, _, index = device.partition(":")
    dev_id = int(index or 0)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    wanted = {"cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider"], "npu": ["CANNExecutionProvider"]}.get(kind)
    if wanted is None:
        raise BackendError(f"onnxruntime backend: unknown device {device!r} (use cpu, cuda:N or npu:N)")
    chosen = [(p, {"device_id": dev_id}) for p in wanted if p in available]
    if not chosen:
        raise BackendError(f"onnxruntime backend: device {device} needs {' or '.join(wanted)}, but this "
                           f"onnxruntime only has {available}; install onnxruntime-gpu (CUDA) or the CANN build")
    return chosen + ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    runtime = ("onnxruntime", "onnxruntime")
    artifact_suffixes = (".onnx", ".ort")
    build_target = "ort"
    device_kinds = ("cpu", "cuda", "npu")

    @classmethod
    def check_device(cls, device: str) -> None:
        super().check_device(device)
        if not device.startswith("cpu"):
            import onnxruntime as ort

            _providers(device, ort.get_available_providers())  # this build has the device's provider

    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        import onnxruntime as ort

        self.check_options(options)
        path = model.weights
        if os.path.isdir(path):  # an artifact directory from `nasq build --target ort|onnx`
            path = self._artifact_file(path)
        path = self._model_file(path, "model.onnx", "an ONNX model")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            opts.intra_op_num_threads = options.threads
            opts.inter_op_num_threads = 1
        self._sess = ort.InferenceSession(path, opts, providers=_providers(self.device, ort.get_available_providers()))
        inp = self._sess.get_inputs()[0]
        out = self._sess.get_outputs()[0]
        self._input, self._output = inp.name, out.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.num_outputs = out.shape[1] if isinstance(out.shape[1], int) else None
        self.model_info = {"artifact": os.path.abspath(path), **(model.options.get("provenance") or {})}

    def _artifact_file(self, folder: str) -> str:
        """The model in an artifact directory for this device: the provider-optimized one if built."""
        order = ["model.cuda.onnx"] if self.device.startswith("cuda") else []
        for name in order + ["model.cpu.onnx", "model.onnx"]:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise BackendError(f"{folder} holds no ONNX model (expected model.cpu.onnx or model.onnx)")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = self._sess.run([self._output], {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "providers": ",".join(self._sess.get_providers())}

    def describe_device(self) -> str:
        provider = self._sess.get_providers()[0].replace("ExecutionProvider", "")
        threads = self._sess.get_session_options().intra_op_num_threads
        gpu = self.environment().get("accelerator") if self.device.startswith("cuda") else None
        return (f"{gpu}, " if gpu else "") + f"ONNX Runtime {provider}" + \
            (f", {threads} threads" if provider == "CPU" and threads else "")

    def environment(self) -> dict:
        if not self.device.startswith("cuda"):
            return {}
        from .devices import gpu_facts

        return gpu_facts((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])

    def close(self) -> None:
        self._sess = None
