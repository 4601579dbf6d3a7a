"""The backend contract."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..data.transforms import normalize_u8
from ..model.spec import ModelRef


class Backend(ABC):
    """One model on one device.

    Subclasses set ``name``, implement ``load``, ``predict`` and ``versions``, and may
    override ``predict_u8`` to normalize uint8 crops on the device.
    """

    name: ClassVar[str]
    #: model artifact suffixes this backend runs (".pth" for a checkpoint)
    artifact_suffixes: ClassVar[tuple[str, ...]]
    #: precisions it can run (the CLI's choices come from here)
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    #: torch.compile modes it accepts, for the backends that compile
    compile_modes: ClassVar[tuple[str, ...]] = ("none",)
    #: the build target (``nasq build --target``) a checkpoint is built to before this backend
    #: runs it, or None when it runs checkpoints (or only prebuilt models) itself
    build_target: ClassVar[str | None] = None
    #: the batch size is part of what ``load`` checks (a compiled shape), so a worker loads the
    #: model again when a run asks for another one
    load_per_batch_size: ClassVar[bool] = False
    #: the kinds of device it runs on (cpu, cuda, npu)
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu",)
    #: the runtime's package, and nasq's extra that installs it (a worker refuses to start without it)
    runtime: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def check_device(cls, device: str) -> None:
        """Refuse, in one line, a device this backend does not run on or this machine does not
        have (a worker calls it before it starts; nothing is initialized on the device).

        Raises:
            BackendError: naming the device and what is missing.
        """
        from ..config import parse_device
        from .devices import check_present

        try:
            kind, _ = parse_device(device)
        except ValueError as e:
            raise BackendError(str(e)) from None
        if kind not in cls.device_kinds:
            shown = " or ".join(k if k == "cpu" else f"{k}:N" for k in cls.device_kinds)
            raise BackendError(f"the {cls.name} backend runs on {shown}, not {device}")
        if cls.runtime is not None:
            import importlib.util

            module, extra = cls.runtime
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:
                found = False
            if not found:
                raise BackendError(f"the {cls.name} backend needs {module}, which is not installed here: "
                                   f"pip install 'nasq[{extra}]'")
        check_present(device)

    def __init__(self, device: str):
        self.device = device
        #: a fixed batch size the loaded model needs (short batches are padded), or None
        self.fixed_batch: int | None = None
        #: number of logits per image, known after load()
        self.num_outputs: int | None = None
        #: provenance of the loaded model (weights hash, arch, ...), filled by load()
        self.model_info: dict = {}

    @abstractmethod
    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        """Load the model once; later calls to ``predict`` reuse it.

        Raises:
            BackendError: a precision or option this runtime or device cannot run.
        """

    def _model_file(self, path: str, in_folder: str, hint: str) -> str:
        """The model file to load: ``in_folder`` inside an artifact directory, or ``path`` itself
        when it has one of this backend's suffixes.

        Raises:
            BackendError: another kind of file (``hint`` says how to build the right one), or none.
        """
        import os

        if os.path.isdir(path):
            path = os.path.join(path, in_folder)
        elif not path.endswith(self.artifact_suffixes):
            raise BackendError(f"{self.name} backend runs {hint}, not {path!r}: build one with `nasq build --target "
                               f"{self.build_target}` (nasq eval does this for you)")
        if not os.path.isfile(path):
            raise BackendError(f"{self.name} model {path!r} does not exist")
        return path

    def check_options(self, options: BackendOptions) -> None:
        """Refuse a precision or compile mode this backend does not have, naming the valid ones."""
        from . import check_options

        check_options(self.name, options.precision, options.compile)

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

    def take_device_ms(self) -> float | None:
        """The device's own execution time in ms of the ``predict`` calls since the last call
        (ais_bench's ``exec_time_list``), or None where the runtime does not report one (then
        compute time is host time around ``predict``)."""
        return None

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory since load or the last ``reset_peak_memory``, where the runtime can tell."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory measurement (per batch size, per sweep point)."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Runtime name -> version, for provenance."""

    def describe_device(self) -> str:
        """The hardware and how it is used, without the device's index (the worker names that:
        every report cell is ``host/device`` and then this), e.g. "NVIDIA H200"."""
        return self.device.split(":", 1)[0]

    def identity(self) -> dict:
        """``device_name`` and ``accelerator`` (``environment()``) for a result: what a reader
        needs, never a reason to lose the result (a failure to describe is written down)."""
        out = {}
        for key, describe in (("device_name", self.describe_device), ("accelerator", self.environment)):
            try:
                out[key] = describe()
            except Exception as e:  # noqa: BLE001 - a device that cannot say what it is still ran
                out[key] = f"unknown ({type(e).__name__}: {e})" if key == "device_name" else {"error": str(e)}
        return out

    def environment(self) -> dict:
        """What a reader needs to trust or repeat a number on this device: the accelerator's
        name, driver and runtime (the report's environment block). Runtime package versions are
        in ``versions()``."""
        return {}

    def close(self) -> None:
        """Release the device."""
