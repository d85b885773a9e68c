"""Fit the out-of-distribution detector that the handler runs on every answer (``handler.ood``).

Fitted on the training split only, plus synthetic outliers made from it (outlier
exposure): no image from the sets the real-world evaluation uses (digits, photos,
faces, text, noise, shapes) is ever seen here.

1. Class-conditional Gaussians with a tied covariance per layer of the embedding
   (``forward_features``), as Lee et al. (2018): the class means and the shared
   precision matrix, with a little shrinkage so a 128-dimensional covariance from a
   few thousand images stays well conditioned.
2. The parts of the score (energy, one Mahalanobis distance per layer, the raw-image
   signals of canonicalisation) for in-distribution images (training garments, as
   they are and rendered as catalogue photos) and for synthetic outliers.
3. A class-balanced, L2-regularised logistic regression on the standardised parts.
4. The threshold: the score that flags ``false_alarm_rate`` of in-distribution images
   of a split the detector never saw (the calibration split, native and photographed).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from handler.canonical import SIGNALS
from handler.ood import Detector, Layer, OODSpec, expand

# How synthetic outliers are made from a training garment (28x28, white on black).
OUTLIER_KINDS = ("permuted", "patch_shuffled", "edges", "zoomed_crop", "clutter", "blend", "stripes", "row", "blobs",
                 "drowned", "faded", "strokes", "pen")


def _mnist_frame(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A light drawing on black the MNIST way: its box scaled to 18-22 px, centred on a 28x28 canvas."""
    rows, cols = np.flatnonzero(ink.max(axis=1) > 20), np.flatnonzero(ink.max(axis=0) > 20)
    if not len(rows):
        return np.zeros((28, 28), dtype=np.float32)
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = rng.uniform(18, 22) / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    small = np.asarray(Image.fromarray(np.clip(ink, 0, 255).astype(np.uint8)).resize(size, Image.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), dtype=np.float32)
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return canvas


def _pen(rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One to three smooth pen strokes (cubic Bezier curves), light on black, 2-4 % of the frame thick."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    t = np.linspace(0, 1, 40)[:, None]
    for _ in range(int(rng.integers(1, 4))):
        p = rng.uniform(0.1, 0.9, size=(4, 2)) * size
        curve = ((1 - t) ** 3) * p[0] + 3 * ((1 - t) ** 2) * t * p[1] + 3 * (1 - t) * t * t * p[2] + t**3 * p[3]
        draw.line([tuple(map(float, q)) for q in curve], fill=int(rng.integers(200, 256)),
                  width=max(2, int(size * rng.uniform(0.06, 0.1))), joint="curve")
    return np.asarray(img.filter(ImageFilter.GaussianBlur(size * 0.01)), dtype=np.float32)


def synthetic_outlier(garments: np.ndarray, i: int, kind: str, rng: np.random.Generator) -> Image.Image:
    """One outlier made from ``garments[i]`` (and, for some kinds, other training garments)."""
    a = garments[i].astype(np.float32)
    if kind == "permuted":  # every pixel of a garment, in random places
        b = rng.permutation(a.ravel()).reshape(a.shape)
    elif kind == "patch_shuffled":  # a garment's 7x7 patches in random order
        p = a.reshape(4, 7, 4, 7).transpose(0, 2, 1, 3).reshape(16, 7, 7)[rng.permutation(16)]
        b = p.reshape(4, 4, 7, 7).transpose(0, 2, 1, 3).reshape(28, 28)
    elif kind == "edges":  # the outline only: thin strokes, or soft thick ones
        gy, gx = np.gradient(a)
        b = np.hypot(gx, gy)
        if rng.random() < 0.5:
            b = np.asarray(Image.fromarray(np.clip(b, 0, 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(float(rng.uniform(0.7, 1.5)))), dtype=np.float32)
        b = b / max(float(b.max()), 1.0) * 255.0
    elif kind == "zoomed_crop":  # a small part of a garment, enlarged: texture, no shape
        s = int(rng.integers(8, 15))
        y0, x0 = rng.integers(0, 28 - s, 2)
        crop = Image.fromarray(a[y0 : y0 + s, x0 : x0 + s].astype(np.uint8))
        b = np.asarray(crop.resize((28, 28), Image.BICUBIC), dtype=np.float32)
    elif kind == "clutter":  # a garment on a busy mosaic of other garments: no backdrop
        tiles = garments[rng.integers(0, len(garments), 16)]
        b = tiles.reshape(4, 4, 28, 28).transpose(0, 2, 1, 3).reshape(112, 112).astype(np.float32)
        big = np.asarray(Image.fromarray(garments[i]).resize((56, 56)), dtype=np.float32)
        b[28:84, 28:84] = np.maximum(b[28:84, 28:84] * 0.5, big)
    elif kind == "blend":  # two garments superimposed, one turned 90 degrees
        b = 0.5 * a + 0.5 * np.rot90(garments[rng.integers(0, len(garments))]).astype(np.float32)
    elif kind == "stripes":  # a garment seen through a grating
        yy, xx = np.mgrid[0:28, 0:28]
        f, th = rng.uniform(0.5, 1.5), rng.uniform(0, np.pi)
        b = a * (0.5 + 0.5 * np.sin(f * (xx * np.cos(th) + yy * np.sin(th))))
    elif kind == "row":  # a line of small garments or their outlines, side by side
        count = int(rng.integers(3, 7))
        picks = garments[rng.integers(0, len(garments), count)].astype(np.float32)
        if rng.random() < 0.5:
            picks = np.stack([np.hypot(*np.gradient(p)) for p in picks])
            picks = picks / max(float(picks.max()), 1.0) * 255.0
        b = np.concatenate(list(picks), axis=1)
    elif kind == "blobs":  # a garment's pixels in random order at low resolution, enlarged: smooth blobs
        side = int(rng.choice([4, 7, 14]))
        low = rng.permutation(a.ravel())[: side * side].reshape(side, side)
        b = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((28, 28), Image.BICUBIC), dtype=np.float32)
        if rng.random() < 0.5:
            b = np.where(b > np.median(b), 255.0, 0.0)
    elif kind == "drowned":  # a garment under noise far stronger than itself, over the whole frame
        side = int(rng.integers(28, 160))
        big = np.asarray(Image.fromarray(garments[i]).resize((side, side), Image.BICUBIC), dtype=np.float32)
        amplitude = float(rng.uniform(150, 255))
        b = big * 0.3 + rng.uniform(0, amplitude, big.shape) if rng.random() < 0.5 else big * 0.3 + rng.normal(128, amplitude / 3, big.shape)
    elif kind == "strokes":  # a garment's skeleton drawn as pen strokes, framed the MNIST way: a line drawing
        from skimage.morphology import skeletonize

        big = np.asarray(Image.fromarray(garments[i]).resize((112, 112), Image.BICUBIC), dtype=np.float32)
        skeleton = skeletonize(big > rng.uniform(40, 90)).astype(np.uint8) * 255
        width = int(rng.integers(5, 11))
        ink = np.asarray(Image.fromarray(skeleton).filter(ImageFilter.MaxFilter(width | 1)).filter(
            ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
        b = _mnist_frame(ink, rng)
    elif kind == "pen":  # free pen strokes, framed the MNIST way (drawn by code, from no data set)
        b = _mnist_frame(_pen(rng), rng)
    elif kind == "faded":  # a garment faded into its background: next to nothing to see
        b = rng.uniform(0, 255) + a * rng.uniform(0.0, 0.04) + rng.normal(0, rng.uniform(0, 2), a.shape)
    else:
        raise ValueError(f"unknown outlier kind {kind!r}; kinds are {', '.join(OUTLIER_KINDS)}")
    return Image.fromarray(np.clip(b, 0, 255).astype(np.uint8))


def synthetic_outliers(garments: np.ndarray, rng: np.random.Generator, render=None, styles=()) -> list[Image.Image | bytes]:
    """One outlier per training garment, the kinds in turn.

    Half of them are presented as they are, half photographed like the garments
    (``render(pattern, style, rng)``, the catalogue renderer: a PIL image or the JPEG file's
    bytes): the framing then says nothing about being an outlier, and the detector must
    learn from the content.
    """
    out = []
    for i in range(len(garments)):
        img = synthetic_outlier(garments, i, OUTLIER_KINDS[i % len(OUTLIER_KINDS)], rng)
        if render is not None and img.size == (28, 28) and rng.random() < 0.5:
            img = render(np.asarray(img), styles[int(rng.integers(len(styles)))], rng)
        out.append(img)
    return out


def layer_slices(widths: tuple[int, ...], hidden: int) -> list[tuple[str, int, int]]:
    """Names and ranges of each layer in ``forward_features``' embedding: the blocks, then the penultimate layer."""
    out, start = [], 0
    for i, width in enumerate((*widths, hidden)):
        name = f"block{i + 1}" if i < len(widths) else "penultimate"
        out.append((name, start, start + width))
        start += width
    return out


def fit_layers(embedding: torch.Tensor, labels: torch.Tensor, slices, num_classes: int,
               shrinkage: float = 1e-3) -> tuple[Layer, ...]:
    """Class means and the tied precision matrix of each slice of the embedding."""
    layers = []
    for name, start, stop in slices:
        e = embedding[:, start:stop].double()
        means = torch.stack([e[labels == k].mean(0) for k in range(num_classes)])
        centred = e - means[labels]
        cov = centred.T @ centred / len(centred)
        cov += shrinkage * cov.diagonal().mean() * torch.eye(stop - start, dtype=cov.dtype)
        layers.append(Layer(name, start, stop, means.float(), torch.linalg.inv(cov).float()))
    return tuple(layers)


def fit_logistic(inside: torch.Tensor, outside: torch.Tensor, l2: float = 1e-3):
    """Class-balanced logistic regression (outlier = 1) on standardised inputs and their squares.

    Returns center, scale (of the inputs), weights (of ``handler.ood.expand``'s features) and bias.
    """
    x = torch.cat([inside, outside]).double()
    y = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))]).double()
    weight = torch.where(y == 1, len(inside) / len(outside), 1.0)
    center, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = expand((x - center) / scale)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return center.float(), scale.float(), w.detach().float(), float(b.item())


def part_names(layers: tuple[Layer, ...]) -> tuple[str, ...]:
    return ("energy", *(f"mahalanobis_{layer.name}" for layer in layers), *SIGNALS)


def parts_matrix(detector: Detector, logits, embedding, signals, names) -> torch.Tensor:
    parts = detector.parts(logits, embedding, signals)
    return torch.stack([parts[name] for name in names], dim=1)


def fit_detector(temperature: float, layers: tuple[Layer, ...], inside: tuple, outside: tuple) -> Detector:
    """The combined detector (threshold not yet set) from (logits, embedding, signals) of both sets."""
    names = part_names(layers)
    scaffold = Detector(OODSpec("features"), temperature, layers, names)
    x_in = parts_matrix(scaffold, *inside, names)
    x_out = parts_matrix(scaffold, *outside, names)
    center, scale, weights, bias = fit_logistic(x_in, x_out)
    return Detector(OODSpec("features"), temperature, layers, names, center, scale, weights, bias)


def threshold_at(scores: torch.Tensor, false_alarm_rate: float) -> float:
    """The score above which ``false_alarm_rate`` of these (in-distribution) scores lie."""
    return float(torch.quantile(scores.double(), 1.0 - false_alarm_rate))


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Area under the ROC curve of telling ``outside`` (higher scores) from ``inside``; ties count half."""
    scores = torch.cat([inside, outside]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks of ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_tpr(inside: torch.Tensor, outside: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of in-distribution images flagged when the threshold flags ``tpr`` of the outliers."""
    threshold = torch.quantile(outside.double(), 1.0 - tpr)
    return float((inside.double() >= threshold).float().mean())
