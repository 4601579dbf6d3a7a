"""PyTorch eager on CPU or CUDA (fp32)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError
from ..spec import PREPROCESS, ModelRef
from .base import Backend

PRECISIONS = ("fp32",)


class TorchBackend(Backend):
    name = "torch"
    artifact_suffixes = (".pth", ".pt")

    def load(self, model: ModelRef, *, batch_size: int, precision: str = "fp32") -> None:
        import torch

        from ..model import load_model

        if precision not in PRECISIONS:
            raise BackendError(f"torch backend: precision {precision!r} is not supported; use one of {PRECISIONS}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"torch backend: device {self.device} requested but CUDA is not available "
                               f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise BackendError(f"torch backend runs on cpu or cuda:N, not {self.device!r}")
        net, info = load_model(model.weights, model.num_outputs)
        self._dev = torch.device(self.device)
        self._net = net.to(self._dev).eval()
        self.num_outputs = info.num_outputs
        self.model_info = info.to_dict()
        shape = (1, 1, 1, 3)
        self._mean = torch.tensor(PREPROCESS.mean, dtype=torch.float32, device=self._dev).view(shape)
        self._std = torch.tensor(PREPROCESS.std, dtype=torch.float32, device=self._dev).view(shape)

    def _run(self, x) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._net(x).float().cpu().numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self._run(torch.from_numpy(np.ascontiguousarray(batch)).to(self._dev))

    def predict_u8(self, batch: np.ndarray) -> np.ndarray:
        import torch

        # Normalize on the device: ship 1 byte per value instead of 4.
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._dev)
        x = ((x.float() / 255.0 - self._mean) / self._std).permute(0, 3, 1, 2).contiguous()
        return self._run(x)

    def versions(self) -> dict[str, str]:
        import torch

        v = {"torch": torch.__version__}
        if self.device.startswith("cuda"):
            v["cuda"] = str(torch.version.cuda)
            v["cudnn"] = str(torch.backends.cudnn.version())
        return v

    def describe_device(self) -> str:
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.get_device_name(self._dev)
        return f"cpu ({torch.get_num_threads()} threads)"

    def close(self) -> None:
        self._net = None
