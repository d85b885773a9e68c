"""Out-of-distribution detection on every answer, from the same forward pass as the logits.

Two detectors, chosen by ``spec.ood.method``:

- ``features``: for a model that offers ``forward_features(x) -> (logits, embedding,
  feature_map)``.  Its parts are the class-conditional Mahalanobis distance (tied
  covariance, Lee et al. 2018) of each layer's slice of the embedding, the energy of
  the logits (Liu et al. 2020) and the raw-image signals measured by
  canonicalisation (``handler.canonical.SIGNALS``).  A logistic combination of the
  standardised parts and their squares, fitted
  on the training split against synthetic outliers made from it (outlier exposure),
  turns them into one score.  Its parameters travel with the model in ``ood.json``.
- ``energy``: for any classifier: the negative free energy ``-T logsumexp(logits / T)``.

Scores are "higher = less like the training data"; an answer is out of distribution
when its score exceeds ``spec.ood.threshold``, set on an in-distribution split the
detector never saw at a stated false-alarm rate (``spec.ood.false_alarm_rate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from handler.canonical import SIGNALS
from handler.errors import SpecError

OOD_FILENAME = "ood.json"
OOD_METHODS = ("features", "energy")


@dataclass(frozen=True)
class OODSpec:
    """Which detector answers ``out_of_distribution`` and where its threshold lies."""

    method: str = "energy"
    threshold: float | None = None  # None: scores are reported, nothing is flagged
    false_alarm_rate: float | None = None  # the in-distribution share flagged when the threshold was set

    def __post_init__(self) -> None:
        if self.method not in OOD_METHODS:
            raise SpecError(f"spec.ood.method must be one of {', '.join(OOD_METHODS)}; got {self.method!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise SpecError(f"spec.ood.threshold must be a finite number or null; got {self.threshold!r}")
        rate = self.false_alarm_rate
        if rate is not None and not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
            raise SpecError(f"spec.ood.false_alarm_rate must be a number in [0, 1] or null; got {rate!r}")


@dataclass(frozen=True)
class Layer:
    """One layer's slice of the embedding and its class means and shared precision matrix."""

    name: str
    start: int
    stop: int
    means: torch.Tensor  # (K, D)
    precision: torch.Tensor  # (D, D), symmetric

    def __post_init__(self) -> None:
        # (x - m)' P (x - m) = x'Px - 2 (Pm)'x + m'Pm: two matrix products per batch instead of a (N, K, D)
        # difference tensor; in float64, so the expansion loses nothing to cancellation.
        p, m = self.precision.double(), self.means.double()
        object.__setattr__(self, "_precision64", p)
        object.__setattr__(self, "_pm", m @ p)  # (K, D); P is symmetric, so m'P = (Pm)'
        object.__setattr__(self, "_mpm", (m @ p * m).sum(dim=1))  # (K,)

    def distance(self, embedding: torch.Tensor) -> torch.Tensor:
        """Smallest squared Mahalanobis distance to a class mean, per row, divided by the dimension."""
        x = embedding[:, self.start : self.stop].double()
        quad = ((x @ self._precision64) * x).sum(dim=1, keepdim=True)  # (N, 1)
        d = (quad - 2.0 * (x @ self._pm.T) + self._mpm).clamp_min(0.0)  # (N, K)
        return (d.min(dim=1).values / (self.stop - self.start)).float()


def expand(z: torch.Tensor) -> torch.Tensor:
    """Standardised parts and their squares: a part far from typical in either direction can count."""
    return torch.cat([z, z * z], dim=1)


def energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Negative free energy: high when no class has a large logit."""
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


@dataclass(frozen=True)
class Detector:
    spec: OODSpec
    temperature: float
    layers: tuple[Layer, ...] = ()
    inputs: tuple[str, ...] = ()  # names of the combined parts, in order
    center: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    bias: float = 0.0

    @property
    def needs_features(self) -> bool:
        return self.spec.method == "features"

    @property
    def needs_signals(self) -> bool:
        """Whether the combination reads canonicalisation's raw-image signals (a model served without
        ``spec.canonical`` has none; its detector combines the other parts only)."""
        return any(name in SIGNALS for name in self.inputs)

    def parts(self, logits: torch.Tensor, embedding: torch.Tensor | None, signals: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each named part of the score, per image: (N,) tensors."""
        out = {"energy": energy(logits.float(), self.temperature)}
        if self.needs_features:
            for layer in self.layers:
                out[f"mahalanobis_{layer.name}"] = torch.log1p(layer.distance(embedding.float()))
            if signals is not None:
                for i, name in enumerate(SIGNALS):
                    out[name] = signals[:, i]
        return out

    def score(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.needs_features:
            return parts["energy"]
        z = (torch.stack([parts[name] for name in self.inputs], dim=1) - self.center) / self.scale
        return expand(z) @ self.weights + self.bias

    def flag(self, score: torch.Tensor) -> torch.Tensor:
        if self.spec.threshold is None:
            return torch.zeros_like(score, dtype=torch.bool)
        return score > self.spec.threshold

    @classmethod
    def build(cls, spec: OODSpec, temperature: float, params: dict[str, Any] | None) -> Detector:
        if spec.method == "energy":
            return cls(spec, temperature)
        if not params:
            raise SpecError(f"spec.ood.method is 'features' but the model carries no {OOD_FILENAME}")
        try:
            layers = tuple(
                Layer(p["name"], int(p["start"]), int(p["stop"]), torch.tensor(p["means"], dtype=torch.float32),
                      torch.tensor(p["precision"], dtype=torch.float32))
                for p in params["layers"]
            )
            combine = params["combine"]
            inputs = tuple(combine["inputs"])
            tensors = {k: torch.tensor(combine[k], dtype=torch.float32) for k in ("center", "scale", "weights")}
            bias = float(combine["bias"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"{OOD_FILENAME} is malformed: {exc!r}") from None
        known = {"energy", *SIGNALS, *(f"mahalanobis_{layer.name}" for layer in layers)}
        if unknown := [name for name in inputs if name not in known]:
            raise SpecError(f"{OOD_FILENAME} combines unknown parts {unknown}; known parts are {sorted(known)}")
        if tensors["center"].shape != (len(inputs),) or tensors["scale"].shape != (len(inputs),):
            raise SpecError(f"{OOD_FILENAME}: center and scale need {len(inputs)} values each")
        if tensors["weights"].shape != (2 * len(inputs),):
            raise SpecError(f"{OOD_FILENAME}: weights need {2 * len(inputs)} values (each part and its square)")
        return cls(spec, temperature, layers, inputs, tensors["center"], tensors["scale"], tensors["weights"], bias)

    def to_params(self) -> dict[str, Any]:
        """The ``ood.json`` this detector was built from (the exporter writes it)."""
        return {
            "layers": [{"name": layer.name, "start": layer.start, "stop": layer.stop, "means": layer.means.tolist(),
                        "precision": layer.precision.tolist()} for layer in self.layers],
            "combine": {"inputs": list(self.inputs), "center": self.center.tolist(), "scale": self.scale.tolist(),
                        "weights": self.weights.tolist(), "bias": self.bias},
        }

