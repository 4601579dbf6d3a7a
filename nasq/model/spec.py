"""Model and preprocessing facts, kept in one frozen place.

These are the seed's reference numerics: Cadene's ``pretrainedmodels`` NASNetALarge with
``TransformImage`` (resize the shorter side to floor(331 / 0.875) = 378, bilinear with
antialias on PIL images, center crop 331, [0, 1], normalize with mean = std = 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SEED_CHECKPOINT_NAME = "nasnetalarge-a1897284.pth"
SEED_CHECKPOINT_MD5 = "78a73e51ee50997294f1f35a34b4de66"


@dataclass(frozen=True)
class PreprocessSpec:
    crop: int = 331
    resize: int = 378  # floor(331 / 0.875), Cadene's TransformImage with scale 0.875
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def chw(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)


@dataclass(frozen=True)
class ArchSpec:
    """NASNet-A hyper-parameters (Cadene's constructor arguments)."""

    name: str
    stem_filters: int
    penultimate_filters: int
    filters_multiplier: int = 2


ARCHS = {
    # NASNet-A Large (6 @ 4032): 88.9 M parameters, 23.8 G multiply-adds at 331x331.
    "large": ArchSpec("large", stem_filters=96, penultimate_filters=4032),
    # Same cells and graph with few filters: for tests and quick demos.
    "tiny": ArchSpec("tiny", stem_filters=16, penultimate_filters=192),
}

PREPROCESS = PreprocessSpec()

# With 1001 outputs (the seed's checkpoint and ONNX), class 0 is "background" and
# ImageNet label k is output k + 1.
BACKGROUND_OUTPUTS = 1001
IMAGENET_CLASSES = 1000


def label_offset(num_outputs: int) -> int:
    """Output index minus ImageNet label (1 when output 0 is background)."""
    if num_outputs == BACKGROUND_OUTPUTS:
        return 1
    if num_outputs == IMAGENET_CLASSES:
        return 0
    raise ValueError(f"a NASNet ImageNet head has 1001 or 1000 outputs, not {num_outputs}")


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the model: a path plus options. JSON-friendly."""

    weights: str
    num_outputs: int | None = None  # None: what the checkpoint has; 1000 drops background
    options: dict = field(default_factory=dict)
    #: the weights file's sha256 when the run was submitted (a worker refuses another file)
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {"weights": self.weights, "num_outputs": self.num_outputs, "options": dict(self.options),
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelRef":
        return cls(weights=d["weights"], num_outputs=d.get("num_outputs"), options=dict(d.get("options") or {}),
                   sha256=d.get("sha256"))
