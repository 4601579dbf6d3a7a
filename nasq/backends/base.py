"""The backend contract."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..data import normalize_u8
from ..spec import ModelRef


class Backend(ABC):
    """One model on one device.

    Subclasses set ``name``, implement ``load``, ``predict`` and ``versions``, and may
    override ``predict_u8`` to normalize uint8 crops on the device.
    """

    name: ClassVar[str]
    #: model artifact suffixes this backend runs (".pth" for a checkpoint)
    artifact_suffixes: ClassVar[tuple[str, ...]]

    def __init__(self, device: str):
        self.device = device
        #: a fixed batch size the loaded model needs (short batches are padded), or None
        self.fixed_batch: int | None = None
        #: number of logits per image, known after load()
        self.num_outputs: int | None = None
        #: provenance of the loaded model (weights hash, arch, ...), filled by load()
        self.model_info: dict = {}

    @abstractmethod
    def load(self, model: ModelRef, *, batch_size: int, precision: str = "fp32", options: dict | None = None) -> None:
        """Load the model once; later calls to ``predict`` reuse it. ``options`` are runtime-specific."""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Normalized float32 NCHW batch -> float32 logits (N, num_outputs)."""

    def predict_u8(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC crops -> logits. The default normalizes on the host."""
        return self.predict(normalize_u8(batch))

    def compute_fn(self, batch: np.ndarray):
        """A zero-argument callable that runs ``batch`` (uint8 NHWC) through the model and
        waits for it: what compute-only benchmarks time. Default: the full predict_u8."""
        return lambda: self.predict_u8(batch)

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory since load or the last ``reset_peak_memory``, where the runtime can tell."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory measurement (per batch size, per sweep point)."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Runtime name -> version, for provenance."""

    def describe_device(self) -> str:
        """A human name for the device (e.g. the GPU model)."""
        return self.device

    def close(self) -> None:
        """Release the device."""
