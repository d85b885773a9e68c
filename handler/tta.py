"""Test-time augmentation: named, label-preserving views of a batch, and merge rules.

Every view maps a normalised batch ``(N, C, H, W)`` to a batch of the same
shape; pixels a view uncovers are filled with the spec's background (in
normalised units), so a shifted Fashion-MNIST image still sits on black.

View names (``spec.tta`` / ``handler.tta`` in model-config.yaml):

- ``identity``
- ``hflip`` / ``vflip``: mirror left-right / top-bottom
- ``shift(dx,dy)``: move the content by whole pixels (``shift(2,0)`` = 2 px right)
- ``zoom(f)``: scale about the centre (``zoom(1.1)`` zooms in 10 %, ``zoom(0.9)`` out)

A ``Gate`` (``spec.tta_gate``) spends the extra views only where they can matter: every
image gets the identity view; only those whose identity answer is not confident (its
top-1 probability, or its top-1 minus top-2 margin, below ``below``) get the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handler.errors import SpecError

MERGE_RULES = ("mean_prob", "mean_logit")
GATE_METRICS = ("top1", "margin")

View = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

VIEWS = ("identity", "hflip", "vflip", "shift(dx,dy)", "zoom(f)")
_SHIFT = re.compile(r"^shift\((-?\d+),\s*(-?\d+)\)$")
_ZOOM = re.compile(r"^zoom\((\d+(?:\.\d+)?)\)$")


def _identity(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


def _vflip(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-2,))


def _shift(dx: int, dy: int) -> View:
    def view(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = fill.expand_as(x).clone()
        if abs(dx) >= w or abs(dy) >= h:
            return out
        src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
        out[..., dst_y, dst_x] = x[..., src_y, src_x]
        return out

    return view


def _zoom(factor: float) -> View:
    def view(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        theta = torch.zeros(n, 2, 3, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / factor
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Sample (x - fill) with zero padding, then add fill back: padding becomes the background.
        return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill

    return view


def parse_view(name: str) -> View:
    """Return the view function for a name, or raise SpecError listing the valid names."""
    if name == "identity":
        return _identity
    if name == "hflip":
        return _hflip
    if name == "vflip":
        return _vflip
    match = _SHIFT.match(name)
    if match:
        return _shift(int(match.group(1)), int(match.group(2)))
    match = _ZOOM.match(name)
    if match and 0.5 <= float(match.group(1)) <= 2.0:
        return _zoom(float(match.group(1)))
    raise SpecError(f"unknown TTA view {name!r}; valid views are {', '.join(VIEWS)} (zoom factor in 0.5..2)")


def background_fill(spec) -> torch.Tensor:
    """The spec's background colour in normalised units, shaped (1, C, 1, 1)."""
    values = [(b / 255.0 - m) / s for b, m, s in zip(spec.background, spec.mean, spec.std)]
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def expand(x: torch.Tensor, views: list[View], fill: torch.Tensor) -> torch.Tensor:
    """Stack all views of a batch view-major: result[v * N + i] is view v of image i."""
    return torch.cat([view(x, fill) for view in views], dim=0)


def merge(logits: torch.Tensor, rule: str, temperature: float = 1.0) -> torch.Tensor:
    """Merge per-view logits ``(V, N, K)`` into probabilities ``(N, K)``."""
    scaled = logits / temperature
    if rule == "mean_prob":
        return torch.softmax(scaled, dim=-1).mean(dim=0)
    if rule == "mean_logit":
        return torch.softmax(scaled.mean(dim=0), dim=-1)
    raise SpecError(f"unknown merge rule {rule!r}; valid rules are {', '.join(MERGE_RULES)}")


def split_views(text: str) -> tuple[str, ...]:
    """'identity,hflip,shift(1,0)' -> ('identity', 'hflip', 'shift(1,0)'): commas inside () stay."""
    return tuple(v.strip() for v in re.findall(r"[^,(]+(?:\([^)]*\))?", text) if v.strip())


@dataclass(frozen=True)
class Gate:
    """Which images get the extra TTA views (``spec.tta_gate``; null: every image that asks).

    The score is read from the identity view's temperature-scaled probabilities: ``top1``
    (the top-1 probability) or ``margin`` (top-1 minus top-2). An image whose score is
    below ``below`` gets every view; the others keep their identity answer.
    """

    metric: str = "margin"
    below: float = 0.5

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise SpecError(f"tta_gate.metric must be one of {', '.join(GATE_METRICS)}; got {self.metric!r}")
        if isinstance(self.below, bool) or not isinstance(self.below, (int, float)) or not 0.0 <= self.below <= 1.0:
            raise SpecError(f"tta_gate.below must be a number in [0, 1] (0: no image gets the extra views, "
                            f"1: nearly all); got {self.below!r}")

    def score(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> (N,) confidence score of the gate's metric."""
        if self.metric == "top1":
            return probs.max(dim=-1).values
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]

    def opens(self, probs: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the images not confident enough on the identity view alone."""
        return self.score(probs) < self.below
