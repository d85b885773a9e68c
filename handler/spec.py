"""The model's preprocessing and serving spec: one frozen object, saved with the model.

The spec is the single source of truth for how an image becomes a tensor
(size, channels, mean/std, resize policy, background for transparency), what
the outputs mean (class names, temperature) and how the server answers (TTA
policy, merge rule, which images get the extra views, "uncertain" threshold,
default top-k), how a photo is brought into the training distribution
(``canonical``) and which out-of-distribution detector and threshold apply
(``ood``).  Training writes it into the TorchScript file (``_extra_files={"spec.json": ...}``) and into the
archive; the handler reads it once in ``initialize()`` and may override the
serving fields from the ``handler:`` section of ``model-config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# SpecError lives in handler.errors and MERGE_RULES in handler.tta (tta imports nothing from
# this module); both stay importable from here: handler.spec.SpecError, handler.spec.MERGE_RULES.
from handler.canonical import CanonicalSpec
from handler.errors import SpecError
from handler.ood import OODSpec
from handler.tta import MERGE_RULES, Gate, parse_view

SPEC_FILENAME = "spec.json"
REFERENCE_FILENAME = "reference.json"

RESIZE_POLICIES = ("pad", "stretch", "crop")


@dataclass(frozen=True)
class Limits:
    """Request limits enforced before any pixel is decoded."""

    max_pixels: int = 40_000_000  # width * height of the encoded image
    max_frames: int = 100  # animated GIF/WebP/TIFF frames
    max_instances: int = 64  # items in one JSON {"instances": [...]} request

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_frames", "max_instances"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width) the model sees
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "pad"  # pad: fit inside, pad with background; stretch; crop: shorter side -> resize_size, centre crop
    resize_size: int | None = None  # shorter side before the centre crop (resize == "crop")
    background: tuple[int, ...] = (0,)  # 0..255 per channel: fill for padding and for transparent pixels
    tta: tuple[str, ...] = ("identity",)  # view names, see handler.tta.VIEWS
    merge: str = "mean_prob"
    # Extra views only for images the identity view is unsure of (handler.tta.Gate); null: for every image.
    tta_gate: Gate | None = None
    temperature: float = 1.0  # logits are divided by this before softmax (fitted on held-out data)
    threshold: float = 0.5  # top-1 probability below this is answered with "uncertain": true
    top_k: int = 3
    name: str = "model"
    limits: Limits = field(default_factory=Limits)
    # Bring photos into the training distribution before resizing (handler.canonical); null: resize only.
    canonical: CanonicalSpec | None = None
    # Which out-of-distribution detector answers "out_of_distribution", and its threshold (handler.ood).
    ood: OODSpec = field(default_factory=OODSpec)

    def __post_init__(self) -> None:
        # Normalise sequences that came from JSON lists into tuples (the dataclass is frozen).
        for name in ("class_names", "input_size", "mean", "std", "background", "tta"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise SpecError(f"spec.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name, kind in (("limits", Limits), ("canonical", CanonicalSpec), ("ood", OODSpec), ("tta_gate", Gate)):
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, _build(kind, getattr(self, name), name))
        self._validate()

    def _validate(self) -> None:
        if self.canonical is not None and not isinstance(self.canonical, CanonicalSpec):
            raise SpecError(f"spec.canonical must be an object of settings or null; got {self.canonical!r}")
        if self.tta_gate is not None and not isinstance(self.tta_gate, Gate):
            raise SpecError(f"spec.tta_gate must be an object like {{\"metric\": \"margin\", \"below\": 0.5}} or null; "
                            f"got {self.tta_gate!r}")
        if not isinstance(self.ood, OODSpec):
            raise SpecError(f"spec.ood must be an object of settings; got {self.ood!r}")
        if len(self.class_names) < 2 or not all(isinstance(c, str) and c for c in self.class_names):
            raise SpecError("spec.class_names must list at least two non-empty names")
        if len(set(self.class_names)) != len(self.class_names):
            raise SpecError("spec.class_names has duplicates")
        if len(self.input_size) != 2 or not all(isinstance(v, int) and v > 0 for v in self.input_size):
            raise SpecError(f"spec.input_size must be [height, width] in pixels, got {list(self.input_size)}")
        if self.channels not in (1, 3):
            raise SpecError(f"spec.channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std", "background"):
            if len(getattr(self, name)) != self.channels:
                raise SpecError(f"spec.{name} needs {self.channels} value(s), got {list(getattr(self, name))}")
        if any(s <= 0 for s in self.std):
            raise SpecError("spec.std values must be > 0")
        if any(not (isinstance(b, int) and 0 <= b <= 255) for b in self.background):
            raise SpecError("spec.background values must be integers in 0..255")
        if self.resize not in RESIZE_POLICIES:
            raise SpecError(f"spec.resize must be one of {', '.join(RESIZE_POLICIES)}; got {self.resize!r}")
        if self.resize == "crop":
            if not isinstance(self.resize_size, int) or self.resize_size < max(self.input_size):
                raise SpecError("spec.resize_size must be an integer >= the input size when resize is 'crop'")
        if not self.tta or self.tta[0] != "identity":
            raise SpecError("spec.tta must start with 'identity' (the view used when TTA is off)")
        if len(set(self.tta)) != len(self.tta):
            raise SpecError(f"spec.tta lists a view twice: {list(self.tta)}")
        for view in self.tta:
            parse_view(view)  # raises SpecError naming the valid views
        if self.merge not in MERGE_RULES:
            raise SpecError(f"spec.merge must be one of {', '.join(MERGE_RULES)}; got {self.merge!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise SpecError("spec.temperature must be a number > 0")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise SpecError("spec.threshold must be a number in [0, 1]")
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= len(self.class_names)):
            raise SpecError(f"spec.top_k must be an integer in 1..{len(self.class_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return _build(cls, data, "spec")

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec.json is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError("spec.json must hold a JSON object")
        return cls.from_dict(data)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> ModelSpec:
        """Apply serving overrides (``handler:`` in model-config.yaml); unknown keys are an error."""
        if not overrides:
            return self
        merged = self.to_dict()
        for key, value in overrides.items():
            if key in ("limits", "canonical", "ood", "tta_gate") and isinstance(value, Mapping) and merged.get(key):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return _build(ModelSpec, merged, "handler")


def _build(cls, data: Mapping[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{where}: unknown setting(s) {unknown}; valid settings are {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise SpecError(f"{where}: {exc}") from None


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
