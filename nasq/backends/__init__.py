"""Inference backends behind one small interface, chosen by name and imported lazily.

A backend's life is ``Backend(device)`` -> ``load(model, batch_size=..., options=BackendOptions(...))``
-> ``predict(batch)`` many times -> ``close()``. The device is handed in, never discovered
inside. Each runtime lives in its own module; only the chosen one is imported.
"""
from __future__ import annotations

import importlib

from ..errors import BackendError
from .base import Backend

_REGISTRY = {
    "torch": "nasq.backends.torch_backend:TorchBackend",
    "onnxruntime": "nasq.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "openvino": "nasq.backends.openvino_backend:OpenVinoBackend",
    "ais_bench": "nasq.backends.ais_bench_backend:AisBenchBackend",
    "sim": "nasq.backends.sim_backend:SimBackend",  # SIMULATED: fleet-scale queue tests only
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``.

    Raises:
        BackendError: unknown name (the message lists the valid ones).
    """
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(names())}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def create(name: str, device: str) -> Backend:
    return backend_class(name)(device)


def precisions(name: str | None = None) -> list[str]:
    """The precisions of one backend, or of any backend (the CLI's choices)."""
    chosen = [name] if name else names()
    return sorted({p for n in chosen for p in backend_class(n).precisions})


def check_options(name: str, precision: str | None = None, compile: str | None = None) -> None:
    """The one rule for a backend's options: a precision (or compile mode) it has; applied where
    they are given (flags, API arguments, a message, a load).

    Raises:
        BackendError: naming the valid ones (also for an unknown backend).
    """
    cls = backend_class(name)
    if precision is not None and precision not in cls.precisions:
        raise BackendError(f"backend {name} runs precision {', '.join(cls.precisions)}, not {precision!r}")
    if compile not in (None, "none") and compile not in cls.compile_modes:
        raise BackendError(f"backend {name}: compile mode {compile!r} is not one of {', '.join(cls.compile_modes)}")


def compile_modes() -> list[str]:
    return sorted({m for n in names() for m in backend_class(n).compile_modes}, key=lambda m: (m != "none", m))


__all__ = ["Backend", "backend_class", "check_options", "compile_modes", "create", "names", "precisions"]
