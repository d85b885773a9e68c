"""Synthetic outliers made from the user's own images, for any size and channel count (outlier exposure).

``scripts.train.ood`` makes Fashion-MNIST's outliers from 28x28 garments; these are the same ideas for
any model input: an image's pixels shuffled, its patches shuffled, its outline, a part of it enlarged, two
images superimposed, a mosaic of several, a grating over it, its negative (the other polarity), smooth
blobs, noise and near-flat frames.  They are made from the user's images at the model's input size and
mode (what the server's preprocessing made of them), then sent through the same preprocessing as an
upload; none comes from an evaluation source.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("permuted", "patch_shuffled", "edges", "zoomed_crop", "blend", "mosaic", "stripes", "negative", "blobs",
         "noise", "flat")


def _resize(arr: np.ndarray, size: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    """(H, W[, 3]) float -> the same at ``size`` (height, width)."""
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((size[1], size[0]), resample), dtype=np.float32)


def outlier(images: np.ndarray, i: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One outlier (uint8, the shape of ``images[i]``) made from ``images[i]`` and, for some kinds, others."""
    a = images[i].astype(np.float32)
    h, w = a.shape[:2]
    colour = a.ndim == 3
    if kind == "permuted":  # every pixel of the image, in random places
        flat = a.reshape(h * w, -1)
        b = flat[rng.permutation(h * w)].reshape(a.shape)
    elif kind == "patch_shuffled":  # its patches (a 4x4 grid) in random order
        g = 4 if min(h, w) >= 8 else 2
        ph, pw = h // g, w // g
        b = a.copy()
        cells = [(r, c) for r in range(g) for c in range(g)]
        for (r, c), (r2, c2) in zip(cells, [cells[j] for j in rng.permutation(len(cells))]):
            b[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = a[r2 * ph:(r2 + 1) * ph, c2 * pw:(c2 + 1) * pw]
    elif kind == "edges":  # its outline only
        lum = a.mean(axis=2) if colour else a
        gy, gx = np.gradient(lum)
        e = np.hypot(gx, gy)
        e = e / max(float(e.max()), 1.0) * 255.0
        b = np.repeat(e[..., None], 3, axis=2) if colour else e
    elif kind == "zoomed_crop":  # a small part of it, enlarged: texture, no shape
        s = max(2, int(min(h, w) * rng.uniform(0.25, 0.5)))
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        b = _resize(a[y0:y0 + s, x0:x0 + s], (h, w))
    elif kind == "blend":  # two images superimposed, the other one turned or mirrored
        other = images[int(rng.integers(len(images)))].astype(np.float32)
        other = np.rot90(other) if h == w else other[::-1, ::-1]
        b = 0.5 * a + 0.5 * other
    elif kind == "mosaic":  # a 2x2 or 3x3 grid of images, brought back to the input size
        n = int(rng.choice([2, 3]))
        picks = images[rng.integers(0, len(images), n * n)].astype(np.float32)
        rows = [np.concatenate(list(picks[r * n:(r + 1) * n]), axis=1) for r in range(n)]
        b = _resize(np.concatenate(rows, axis=0), (h, w), Image.BILINEAR)
    elif kind == "stripes":  # the image seen through a grating
        yy, xx = np.mgrid[0:h, 0:w]
        f, th = rng.uniform(0.8, 2.0) * 8 / max(h, w) * np.pi, rng.uniform(0, np.pi)
        grating = 0.5 + 0.5 * np.sin(f * (xx * np.cos(th) + yy * np.sin(th)))
        b = a * (grating[..., None] if colour else grating)
    elif kind == "negative":  # the other polarity
        b = 255.0 - a
    elif kind == "blobs":  # the image's values in random order at low resolution, enlarged
        side = int(rng.choice([2, 3, 4]))
        flat = a.reshape(h * w, -1)
        low = flat[rng.permutation(h * w)[: side * side]].reshape((side, side) + a.shape[2:])
        b = _resize(low, (h, w))
    elif kind == "noise":  # uniform or Gaussian noise, sometimes smoothed
        shape = a.shape
        b = rng.uniform(0, 255, shape) if rng.random() < 0.5 else rng.normal(rng.uniform(60, 200), rng.uniform(20, 80), shape)
        if rng.random() < 0.5:
            b = np.asarray(Image.fromarray(np.clip(b, 0, 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(max(0.5, min(h, w) / 16))), dtype=np.float32)
    elif kind == "flat":  # next to nothing to see: a near-uniform frame of any level
        b = np.full(a.shape, rng.uniform(0, 255), dtype=np.float32) + rng.normal(0, rng.uniform(0, 6), a.shape)
    else:
        raise ValueError(f"unknown outlier kind {kind!r}; kinds are {', '.join(KINDS)}")
    return np.clip(np.rint(b), 0, 255).astype(np.uint8)


def outliers(images: np.ndarray, n: int, rng: np.random.Generator) -> tuple[list[Image.Image], list[str]]:
    """``n`` outliers, the kinds in turn, each made from a random image of ``images`` (uint8, model size and mode)."""
    out, kinds = [], []
    for j in range(n):
        kind = KINDS[j % len(KINDS)]
        arr = outlier(images, int(rng.integers(len(images))), kind, rng)
        out.append(Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB"))
        kinds.append(kind)
    return out, kinds
