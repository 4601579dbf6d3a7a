"""NASNet-A Large with the seed's reference numerics.

The module is Cadene's ``pretrainedmodels.models.nasnet.NASNetALarge``, used unmodified.
Checkpoints are plain state dicts in its key layout, with a 1001-way head (class 0 is
background, as in the seed's ``nasnetalarge-a1897284.pth``) or a 1000-way one. The
architecture (large or the tiny test configuration) is read off the tensor shapes, so
every checkpoint goes through the same loading code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import CheckpointError
from ..files import file_digest
from .spec import (ARCHS, BACKGROUND_OUTPUTS, IMAGENET_CLASSES, SEED_CHECKPOINT_MD5,
                   SEED_CHECKPOINT_NAME, ArchSpec)


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model; goes into every report."""

    weights: str
    sha256: str
    arch: str
    checkpoint_outputs: int
    num_outputs: int
    param_count: int | None = None
    #: the file is the published checkpoint (its md5 is the seed's)
    published: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_model(arch: ArchSpec | str = "large", num_outputs: int = BACKGROUND_OUTPUTS):
    """A freshly initialised NASNet-A (Cadene's module) in eval mode.

    Args:
        arch: "large", "tiny" or an ``ArchSpec``.
        num_outputs: 1001 (background at 0) or 1000.
    """
    from .cadene import nasnet

    NASNetALarge = nasnet().NASNetALarge

    spec = ARCHS[arch] if isinstance(arch, str) else arch
    model = NASNetALarge(num_classes=num_outputs, stem_filters=spec.stem_filters,
                         penultimate_filters=spec.penultimate_filters,
                         filters_multiplier=spec.filters_multiplier)
    return model.eval()


def infer_arch(state_dict: dict) -> ArchSpec:
    """The NASNet-A configuration a state dict was saved from."""
    try:
        stem = int(state_dict["conv0.conv.weight"].shape[0])
        penultimate = int(state_dict["last_linear.weight"].shape[1])
    except KeyError as e:
        raise CheckpointError(
            f"not a NASNet-A Large state dict: key {e.args[0]!r} is missing "
            "(expected Cadene's pretrainedmodels layout, e.g. 'conv0.conv.weight', 'last_linear.weight')") from None
    for spec in ARCHS.values():
        if (spec.stem_filters, spec.penultimate_filters) == (stem, penultimate):
            return spec
    return ArchSpec("custom", stem_filters=stem, penultimate_filters=penultimate)


def check_file(path: str | os.PathLike) -> str:
    """What can be checked of a checkpoint without torch: that it is a file, and the md5 of the
    published checkpoint's file name. Returns the path.

    Raises:
        CheckpointError: no such file, or the published name with another md5.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.basename(path) == SEED_CHECKPOINT_NAME:
        md5 = file_digest(path, "md5")
        if md5 != SEED_CHECKPOINT_MD5:
            raise CheckpointError(
                f"{path}: md5 is {md5}, but the published checkpoint {SEED_CHECKPOINT_NAME} has "
                f"{SEED_CHECKPOINT_MD5}. The file is corrupt or truncated, or a different checkpoint "
                "was saved under this name: download it again, or rename your own checkpoint.")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a state dict from disk, refusing the seed checkpoint if its md5 is wrong.

    Raises:
        CheckpointError: missing or unreadable file, md5 mismatch for the seed's file name,
            or a file that does not hold a state dict.
    """
    import torch

    path = check_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        # torch's own message quotes the file and suggests weights_only=False, which would let
        # the file run code: say what is wrong instead
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            why = ("it holds Python objects besides tensors; nasq loads tensors only (loading other objects "
                   "can run code). Save the model's state_dict() instead")
        else:
            why = f"it is corrupt, truncated or not a PyTorch file ({type(e).__name__})"
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path!r} does not hold a state dict")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_state_dict(state: dict, weights: str, num_outputs: int | None = None) -> ArchSpec:
    """Check a whole state dict against NASNet-A before anything is queued: the head size, every
    key and every tensor's shape (the model is built on PyTorch's meta device: no memory, no
    time).

    Raises:
        CheckpointError: naming the first few missing, unexpected or misshapen tensors.
    """
    import torch

    arch = infer_arch(state)
    outputs = head_outputs(state, weights)
    if num_outputs not in (None, outputs) and not (num_outputs == IMAGENET_CLASSES and outputs == BACKGROUND_OUTPUTS):
        raise CheckpointError(f"{weights}: cannot make {num_outputs} outputs from a {outputs}-way head")
    with torch.device("meta"):
        want = build_model(arch, outputs).state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})" for k in want
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 f"{len(shapes)} of the wrong shape (e.g. {'; '.join(shapes[:2])})" if shapes else ""]
        raise CheckpointError(f"{weights}: not a NASNet-A ({arch.name}) state dict in Cadene's layout: "
                              + ", ".join(p for p in parts if p))
    return arch


def head_outputs(state: dict, weights) -> int:
    """The classifier's outputs: 1001 (background at 0) or 1000 (CheckpointError otherwise)."""
    outputs = int(state["last_linear.weight"].shape[0])
    if outputs not in (BACKGROUND_OUTPUTS, IMAGENET_CLASSES):
        raise CheckpointError(f"{weights}: the head has {outputs} outputs; nasq evaluates ImageNet heads with "
                              "1001 (background at 0) or 1000 outputs")
    return outputs


def load_model(weights: str | os.PathLike, num_outputs: int | None = None):
    """Load a checkpoint into Cadene's NASNetALarge.

    Args:
        weights: path of a state dict in the Cadene layout (1001 or 1000 outputs).
        num_outputs: None keeps the checkpoint's head; 1000 drops the background row of a
            1001-way head (Cadene's "imagenet" setting); 1001 needs a 1001-way checkpoint.

    Returns:
        (model in eval mode on the CPU, ModelInfo)

    Raises:
        CheckpointError: see ``read_checkpoint``; also a head size or key layout mismatch.
    """
    state = read_checkpoint(weights)
    arch = infer_arch(state)
    ckpt_outputs = head_outputs(state, weights)
    want = ckpt_outputs if num_outputs is None else int(num_outputs)
    if want == IMAGENET_CLASSES and ckpt_outputs == BACKGROUND_OUTPUTS:
        state = dict(state)
        state["last_linear.weight"] = state["last_linear.weight"][1:]
        state["last_linear.bias"] = state["last_linear.bias"][1:]
    elif want != ckpt_outputs:
        raise CheckpointError(f"{weights}: cannot make {want} outputs from a {ckpt_outputs}-way head")
    model = build_model(arch, want)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: key layout does not match NASNet-A ({arch.name}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    info = ModelInfo(weights=os.path.abspath(weights), sha256=file_digest(weights), arch=arch.name,
                     param_count=sum(p.numel() for p in model.parameters()),
                     checkpoint_outputs=ckpt_outputs, num_outputs=want,
                     published=file_digest(weights, "md5") == SEED_CHECKPOINT_MD5)
    return model.eval(), info
