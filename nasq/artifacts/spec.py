"""What a build produces, and its key.

The key is the sha256 of the weights' content, the build options and the tool versions:
the same inputs always map to the same artifact directory, so a build runs once.
It is computed without importing torch or onnx, so a cache hit answers in well under a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version

from ..errors import NasqError

TARGETS = ("onnx", "ort", "om", "trt")
DEFAULT_OPSET = 17
ATC_OPSET = 11  # the opset the seed's ATC accepted


def tool_versions(target: str) -> dict[str, str]:
    names = ["torch", "onnx", "onnxsim", "onnxruntime"]
    if target == "trt":
        names.append("tensorrt")
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


@dataclass(frozen=True)
class BuildSpec:
    weights: str
    weights_sha256: str
    target: str
    num_outputs: int | None = None
    opset: int = DEFAULT_OPSET
    batch_size: int | None = None  # fixed batch; None: dynamic
    gears: tuple[int, ...] | None = None  # om: --dynamic_batch_size gears
    soc_version: str | None = None
    tolerance: float = 1e-4  # max |diff| / max |logit|
    accept_tolerance: bool = False
    versions: dict = field(default_factory=dict)
    onnx_key: str | None = None  # device targets: the ONNX artifact they are built from
    token: str = field(default_factory=lambda: secrets.token_hex(6))  # this request, for lock ownership

    @property
    def key(self) -> str:
        d = asdict(self)
        for k in ("weights", "tolerance", "accept_tolerance", "token"):
            d.pop(k)
        return f"{self.target}-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:24]

    def onnx_spec(self) -> "BuildSpec":
        """The ONNX artifact a device target is built from."""
        return replace(self, target="onnx", soc_version=None, gears=None, onnx_key=None,
                       versions=tool_versions("onnx"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gears"] = list(self.gears) if self.gears else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BuildSpec":
        d = dict(d)
        d["gears"] = tuple(d["gears"]) if d.get("gears") else None
        return cls(**d)


def normalize_soc(soc: str | None) -> str | None:
    if soc is None:
        return None
    return soc if soc.startswith("Ascend") else f"Ascend{soc}"


def make_spec(*, weights: str, target: str, cache_dir: str, num_outputs: int | None = None,
              opset: int | None = None, batch_size: int | None = None, gears: list[int] | None = None,
              soc_version: str | None = None, tolerance: float = 1e-4, accept_tolerance: bool = False) -> BuildSpec:
    from ..files import cached_sha256

    if target not in TARGETS:
        raise NasqError(f"unknown build target {target!r}; choose one of {', '.join(TARGETS)}")
    weights = os.path.abspath(weights)
    if not os.path.isfile(weights):
        raise NasqError(f"weights {weights!r} do not exist")
    if target == "om" and not soc_version:
        raise NasqError("--target om needs --soc-version (e.g. Ascend310P3; `npu-smi info` shows the chip name)")
    if gears and target != "om":
        raise NasqError("dynamic batch gears are an ATC (--target om) option")
    if opset is None:
        opset = ATC_OPSET if target == "om" else DEFAULT_OPSET
    if target == "om" and not gears and batch_size is None:
        batch_size = 1  # one .om per batch size, like the seed's bs1 model
    sha = cached_sha256(weights, os.path.join(cache_dir, "digests.json"))
    spec = BuildSpec(weights=weights, weights_sha256=sha, target=target, num_outputs=num_outputs, opset=opset,
                     batch_size=None if gears else batch_size, gears=tuple(sorted(gears)) if gears else None,
                     soc_version=normalize_soc(soc_version), tolerance=tolerance,
                     accept_tolerance=accept_tolerance, versions=tool_versions(target))
    if target != "onnx":
        spec = replace(spec, onnx_key=spec.onnx_spec().key)
    return spec
