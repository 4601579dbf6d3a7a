"""What a build produces, and its key.

The key is the sha256 of the weights' content, the build options and the tool versions:
the same inputs always map to the same artifact directory, so a build runs once.
It is computed without importing torch or onnx, so a cache hit answers in well under a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import NasqError
from ..versions import package_versions

TARGETS = ("onnx", "ort", "ov", "om", "trt")
DEFAULT_OPSET = 17
ATC_OPSET = 11  # the opset the seed's ATC accepted
_HEX = re.compile(r"[0-9a-f]{1,64}")
_KEY = re.compile(r"(onnx|ort|ov|om|trt)-[0-9a-f]{24}")


def tool_versions(target: str) -> dict[str, str]:
    names = ["torch", "onnx", "onnxsim", "onnxruntime"]
    if target == "trt":
        names.append("tensorrt")
    if target == "ov":
        names.append("openvino")
    return package_versions(names)


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
        """A spec from a message, every field checked (its key and token become folder names).

        Raises:
            NasqError: an unknown field or a value of the wrong type or range.
        """
        if not isinstance(d, dict) or set(d) - {f.name for f in fields(cls)}:
            raise NasqError(f"not a build spec: unknown fields {sorted(set(d) - {f.name for f in fields(cls)})}"
                            if isinstance(d, dict) else "not a build spec")
        d = dict(d)
        small = lambda v, hi: v is None or isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi  # noqa: E731
        checks = {
            "weights": isinstance(d.get("weights"), str) and os.path.isabs(d["weights"]),
            "weights_sha256": isinstance(d.get("weights_sha256"), str) and _HEX.fullmatch(d["weights_sha256"]),
            "target": d.get("target") in TARGETS,
            "num_outputs": d.get("num_outputs") in (None, 1000, 1001),
            "opset": small(d.get("opset", DEFAULT_OPSET), 30),
            "batch_size": small(d.get("batch_size"), 1024),
            "gears": d.get("gears") is None or isinstance(d["gears"], (list, tuple)) and all(small(g, 1024)
                                                                                           for g in d["gears"]),
            "soc_version": d.get("soc_version") is None or isinstance(d["soc_version"], str)
            and re.fullmatch(r"[A-Za-z0-9_]{1,32}", d["soc_version"]),
            "tolerance": isinstance(d.get("tolerance", 1e-4), (int, float)) and 0 < d.get("tolerance", 1e-4) <= 1,
            "accept_tolerance": isinstance(d.get("accept_tolerance", False), bool),
            "versions": isinstance(d.get("versions", {}), dict),
            "onnx_key": d.get("onnx_key") is None or isinstance(d["onnx_key"], str) and _KEY.fullmatch(d["onnx_key"]),
            "token": isinstance(d.get("token"), str) and _HEX.fullmatch(d["token"]),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise NasqError(f"build spec: bad {', '.join(bad)}")
        d["gears"] = tuple(d["gears"]) if d.get("gears") else None
        return cls(**d)

    def within(self, roots) -> "BuildSpec":
        """This spec with its weights resolved and checked against a worker's read roots."""
        return replace(self, weights=roots.readable(self.weights, "weights"))


def normalize_soc(soc: str | None) -> str | None:
    if soc is None:
        return None
    return soc if soc.startswith("Ascend") else f"Ascend{soc}"


def check_om_options(soc_version: str | None, gears: list[int] | None) -> None:
    """The chip name and the gears as ATC takes them.

    Raises:
        NasqError: a chip name that is not AscendXXX, or gears ATC refuses.
    """
    if soc_version and not re.fullmatch(r"Ascend[A-Za-z0-9]{1,26}", normalize_soc(soc_version)):
        raise NasqError(f"--soc-version {soc_version!r} is not a chip name such as Ascend310P3 (see `npu-smi info`)")
    if gears and (not 2 <= len(gears) <= 100 or len(set(gears)) != len(gears)
                  or not all(1 <= g <= 2048 for g in gears)):
        raise NasqError(f"--gears {','.join(map(str, gears))}: ATC takes 2 to 100 different gears, each 1 to 2048 "
                        "(for one batch size, build a static .om with -b instead)")


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
    check_om_options(soc_version, gears)
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
