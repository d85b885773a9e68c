"""Propose the spec of a classifier from the model and the user's labelled images, by measurement.

A user who writes ``spec.json`` by hand can get the very things wrong that the project exists to prevent
(the normalisation, the polarity, the input size, which output is which class).  Each is measured here on
the user's images instead, as the doctor measures them (``scripts.diagnose.doctor``):

- **input shape**: the channel counts and sizes the model runs on (a batch in, ``(N, K)`` out), probed
  from the images' own size and the usual sizes; with several, the best-scoring below wins;
- **resize policy** (when the images are not already at the input size): pad, stretch or crop;
- **normalisation**: [0,1], [-1,1], 0-255, ImageNet mean/std (grey: its average), and the images' own
  mean/std (what a training script computes, e.g. Fashion-MNIST's 0.286/0.353);
- **polarity and channel order**: the images as they are against their negative (and BGR for colour);
  only "as they are" can be served (the spec has no inversion), so a model that answers the negative
  clearly better is refused, with the measurement;
- **classes**: the class folders' names, matched to the model's outputs by the assignment that answers
  most images right (``scipy.optimize.linear_sum_assignment`` on the folder x output counts), kept in the
  folders' natural order unless the assignment is clearly better (a random model gets the natural order).

Every combination is scored by the negative log-likelihood of the labels after fitting a temperature
(a proper score: it rewards being right and being confident only when right), on at most ``limit``
images; the background (padding, transparency) is the images' border colour.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from handler.preprocess import canonical_image
from handler.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from scripts.byo.folder import Folder
from scripts.diagnose import doctor

CLEARLY_BETTER = doctor.CLEARLY_BETTER  # accuracy points by which an unservable variant must win to be a fault
SIZES = (8, 16, 28, 32, 48, 64, 96, 112, 128, 160, 224, 256, 299)
RESIZES = ("pad", "stretch", "crop")
CROP_RATIO = 256 / 224  # the shorter side before a centre crop, as ImageNet models are evaluated


class ProposalError(RuntimeError):
    """No spec can be proposed for this model and these images; ``check`` names the doctor's check."""

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check


@dataclass
class Candidate:
    size: tuple[int, int]
    channels: int
    resize: str
    convention: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    variant: str  # "as is", "negative", "BGR"
    accuracy: float
    nll: float
    mapping: list[int]  # folder index -> model output index
    collapsed: bool = False  # its answers pile onto few classes (scripts.diagnose.doctor.check_collapse)

    def row(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "resize": self.resize,
                "convention": self.convention, "mean": [round(v, 4) for v in self.mean],
                "std": [round(v, 4) for v in self.std], "variant": self.variant,
                "accuracy": round(self.accuracy, 4), "nll": round(self.nll, 4)}


@dataclass
class Proposal:
    spec: ModelSpec
    best: Candidate
    candidates: list[Candidate]
    accepted_shapes: list[list[int]]
    order: str  # how the classes were matched to the outputs
    polarity: str
    images: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        ranked = sorted(self.candidates, key=lambda c: c.nll)
        return {"spec": self.spec.to_dict(), "accepted_shapes": self.accepted_shapes, "class_order": self.order,
                "polarity": self.polarity, "images": self.images, "notes": self.notes,
                "chosen": self.best.row(), "candidates": [c.row() for c in ranked[:40]]}


# --- the input shape --------------------------------------------------------------------------------------
def modal_size(images) -> tuple[int, int]:
    sizes = [(img.size[1], img.size[0]) for img in images]
    values, counts = np.unique(np.asarray(sizes), axis=0, return_counts=True)
    h, w = values[int(np.argmax(counts))]
    return int(h), int(w)


def accepted_shapes(model, channels_first: int, size: tuple[int, int]) -> tuple[list[tuple[int, int, int]], int | None]:
    """(channels, height, width) the model maps a batch of to (N, K), and K."""
    sizes = list(dict.fromkeys([size, *((s, s) for s in SIZES)]))
    found, k = [], None
    for channels in dict.fromkeys((channels_first, 1, 3)):
        for h, w in sizes:
            out = doctor._runs(model, torch.zeros(2, channels, h, w))
            if out is not None and out.ndim == 2 and out.shape[0] == 2:
                found.append((channels, h, w))
                k = k or int(out.shape[1])
    return found, k


def provisional_spec(folder: Folder, channels: int, size: tuple[int, int], k: int | None = None) -> ModelSpec:
    names = folder.class_names if k in (None, len(folder.class_names)) else tuple(f"class_{i}" for i in range(k))
    return ModelSpec(class_names=names, input_size=size, channels=channels, mean=(0.0,) * channels,
                     std=(1.0,) * channels, background=(0,) * channels)


# --- scoring ----------------------------------------------------------------------------------------------
def conventions(channels: int, unit: torch.Tensor) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    grey = channels == 1
    own_mean = tuple(round(float(v), 4) for v in unit.mean(dim=(0, 2, 3)))
    own_std = tuple(round(max(float(v), 1e-3), 4) for v in unit.std(dim=(0, 2, 3)))
    return {
        "[0,1]": ((0.0,) * channels, (1.0,) * channels),
        "[-1,1]": ((0.5,) * channels, (0.5,) * channels),
        "0-255": ((0.0,) * channels, (1 / 255.0,) * channels),
        "ImageNet mean/std": ((round(sum(IMAGENET_MEAN) / 3, 4),), (round(sum(IMAGENET_STD) / 3, 4),)) if grey
        else (IMAGENET_MEAN, IMAGENET_STD),
        "the images' mean/std": (own_mean, own_std),
    }


def assign(logits: torch.Tensor, labels: np.ndarray, k: int, natural: list[int]) -> tuple[list[int], str]:
    """Folder -> output: the assignment that answers most images right, or the natural order unless clearly worse."""
    pred = logits.argmax(1).numpy()
    folders = int(labels.max()) + 1
    counts = np.zeros((folders, k), dtype=np.int64)
    np.add.at(counts, (labels, pred), 1)
    rows, cols = linear_sum_assignment(-counts)
    best = [0] * folders
    for r, c in zip(rows, cols):
        best[r] = int(c)
    n = len(labels)
    right_best = int(counts[np.arange(folders), best].sum())
    right_natural = int(counts[np.arange(folders), natural].sum())
    p = right_natural / n
    margin = max(0.02 * n, 3 * math.sqrt(max(p * (1 - p), 0.01) * n))
    if right_best >= right_natural + margin:
        return best, "matched"
    return natural, "natural"


def score(logits: torch.Tensor, labels: np.ndarray, mapping: list[int]) -> tuple[float, float]:
    """(accuracy, calibrated negative log-likelihood) of the labels under ``mapping``."""
    target = torch.as_tensor(np.asarray(mapping)[labels])
    accuracy = float((logits.argmax(1) == target).float().mean())
    return accuracy, calibrated_nll(logits, target)


def calibrated_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The NLL at the best temperature on a log grid from 0.05 to 20 (a search, not a fit: many candidates)."""
    temperatures = torch.logspace(math.log10(0.05), math.log10(20.0), 49, dtype=torch.float64)
    scaled = logits.double().unsqueeze(0) / temperatures.view(-1, 1, 1)  # (T, N, K)
    nll = torch.logsumexp(scaled, dim=2) - scaled.gather(2, target.view(1, -1, 1).expand(len(temperatures), -1, 1)).squeeze(2)
    return float(nll.mean(dim=1).min())


def _unit(arrays: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arrays).float().div(255.0)
    return (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()


def _variants(unit: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"as is": unit, "negative": 1.0 - unit}
    if unit.shape[1] == 3:
        out["BGR"] = unit.flip(1)
    return out


def stratified(labels: np.ndarray, limit: int) -> np.ndarray:
    rows = np.argsort(labels, kind="stable")
    if len(rows) > limit:  # every k-th row of the label-sorted list keeps every class's share
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    return np.sort(rows)


def background_of(images) -> tuple[int, ...]:
    """The images' border colour (median of a 1-pixel ring over all of them), snapped to black or white when near."""
    rings = []
    for img in images:
        a = np.asarray(img)
        a = a[..., None] if a.ndim == 2 else a
        rings.append(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).reshape(-1, a.shape[2]))
    median = np.median(np.concatenate(rings), axis=0)
    return tuple(0 if v < 32 else 255 if v > 223 else int(round(v)) for v in median)


def _prepared(images, spec: ModelSpec) -> np.ndarray:
    return np.stack([np.asarray(canonical_image(img, spec).image, dtype=np.uint8) for img in images])


def propose(model, folder: Folder, name: str, limit: int = 400, budget_s: float = 90.0, log=print) -> Proposal:
    """The spec that serves ``model`` best on ``folder``'s images (see the module docstring)."""
    decoded_all = folder.images(stratified(folder.labels, limit))
    labels_all = folder.labels[stratified(folder.labels, limit)]
    grey = all(img.mode == "L" for img in decoded_all)
    size = modal_size(decoded_all)
    shapes, k = accepted_shapes(model, 1 if grey else 3, size)
    if not shapes:
        verdict = doctor.check_shape(model, provisional_spec(folder, 1 if grey else 3, size))
        raise ProposalError("input shape", verdict.summary)
    if k != len(folder.class_names):
        raise ProposalError("input shape", f"the model has {k} outputs but DATA has {len(folder.class_names)} class "
                            f"folders ({', '.join(folder.class_names[:6])}{', ...' if len(folder.class_names) > 6 else ''}): "
                            "give one folder per output class, or pass SPEC=spec.json naming the model's classes")
    # Channels: the images' own when the model takes them; sizes: the three nearest the images' (log scale).
    channels_ok = sorted({c for c, _, _ in shapes}, key=lambda c: c != (1 if grey else 3))
    channels = channels_ok[0]
    sizes = sorted({(h, w) for c, h, w in shapes if c == channels},
                   key=lambda s: abs(math.log(s[0] * s[1] / (size[0] * size[1]))))[:3]
    at_size = {s: all((img.size[1], img.size[0]) == s for img in decoded_all) for s in sizes}
    plans = [(s, r) for s in sizes for r in (("pad",) if at_size[s] else RESIZES)]
    # Keep the search within the time budget: the images scored shrink with the number of combinations.
    probe = provisional_spec(folder, channels, sizes[0])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(_unit(_prepared(decoded_all[:16], probe)))
    per_image = (time.perf_counter() - t0) / 16
    combos = len(plans) * 5 * (3 if channels == 3 else 2)
    n = int(max(60, min(len(decoded_all), budget_s / max(per_image * combos, 1e-6))))
    rows = stratified(labels_all, n)
    decoded, labels = [decoded_all[i] for i in rows], labels_all[rows]
    natural = list(range(k))
    log(f"proposing a spec: {len(decoded)} images, {len(plans)} size/resize plan(s) x 5 normalisations x "
        f"{3 if channels == 3 else 2} variants (accepted inputs: {', '.join(f'{c}x{h}x{w}' for c, h, w in shapes[:6])}"
        f"{', ...' if len(shapes) > 6 else ''})")
    candidates = []
    for (h, w), resize in plans:
        spec = ModelSpec(class_names=folder.class_names, input_size=(h, w), channels=channels,
                         mean=(0.0,) * channels, std=(1.0,) * channels, resize=resize,
                         resize_size=int(round(max(h, w) * CROP_RATIO)) if resize == "crop" else None,
                         background=(0,) * channels)
        unit = _unit(_prepared(decoded, spec))
        for convention, (mean, std) in conventions(channels, unit).items():
            for variant, pixels in _variants(unit).items():
                logits = doctor.predict(model, doctor.normalise(pixels, mean, std))
                if not torch.isfinite(logits).all():
                    continue
                mapping, _ = assign(logits, labels, k, natural)
                accuracy, nll = score(logits, labels, mapping)
                collapsed = doctor.check_collapse(logits.argmax(1).numpy(), np.asarray(mapping)[labels], k).ok is False
                candidates.append(Candidate((h, w), channels, resize, convention, tuple(mean), tuple(std), variant,
                                            accuracy, nll, mapping, collapsed))
    servable = [c for c in candidates if c.variant == "as is"]
    if not servable:
        raise ProposalError("logits", "the model's outputs are not finite on any input convention")
    best = min(servable, key=lambda c: c.nll)
    unservable = [c for c in candidates if c.variant != "as is"]
    # A rival whose answers collapse is no evidence of another polarity (a collapsed model is the doctor's to name).
    rival = max((c for c in unservable if not c.collapsed), key=lambda c: c.accuracy, default=None)
    if rival is not None and rival.accuracy >= best.accuracy + CLEARLY_BETTER:
        what = ("your images' negative" if rival.variant == "negative" else "your images with red and blue swapped (BGR)")
        raise ProposalError("channel order and polarity",
                            f"the model answers {what} far better ({rival.accuracy:.1%}) than your images as they are "
                            f"({best.accuracy:.1%}): it was trained on the other "
                            f"{'polarity' if rival.variant == 'negative' else 'channel order'}. The server sends images "
                            "as they come, so either retrain (or wrap) the model for images like yours, or give it "
                            "images like the ones it was trained on")
    mapping = best.mapping
    order = "matched" if mapping != natural else "natural"
    class_names = [""] * k
    for folder_index, output in enumerate(mapping):
        class_names[output] = folder.class_names[folder_index]
    background = background_of(decoded_all)
    if channels == 3 and len(background) == 1:
        background = background * 3
    if channels == 1 and len(background) == 3:
        background = (int(round(sum(background) / 3)),)
    spec = ModelSpec(name=name, class_names=tuple(class_names), input_size=best.size, channels=channels,
                     mean=tuple(round(v, 4) for v in best.mean), std=tuple(round(v, 4) for v in best.std),
                     resize=best.resize, resize_size=int(round(max(best.size) * CROP_RATIO)) if best.resize == "crop" else None,
                     background=background, tta=("identity",), top_k=min(3, k))
    lum = background[0] if channels == 1 else 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    polarity = "light objects on a dark background" if lum < 128 else "dark objects on a light background"
    notes = []
    if order == "natural" and best.accuracy < 1.5 / k:
        notes.append("the model answers at about chance whichever way its outputs are matched to the folders: "
                     "the classes are kept in the folders' natural order")
    return Proposal(spec, best, candidates, [list(s) for s in shapes], order, polarity, len(decoded), notes)
