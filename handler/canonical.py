"""Canonicalisation: bring a photo of an object into the training distribution.

Fashion-MNIST was made from product photos (Xiao, Rasul & Vollgraf 2017, section 2):
trim the edges close to the corner colour, scale the longest edge to 28, centre on
the canvas, negate, 8-bit grayscale.  ``canonicalise`` does the same, generalised
to the photos users send:

1. estimate the background from the image border (the most common colour of a thin
   ring, robust to an object that touches the edge) and the border's noise level;
2. mark the pixels that differ from the background by more than
   ``max(tolerance, noise_factor x noise)`` (on a median-filtered copy, so JPEG
   artefacts and sensor noise do not count) and trim to their bounding box;
3. turn the crop into the model's mode, invert it when the background is light (the
   model was trained on light objects on black), and stretch its levels so the
   background becomes the model's background and the object's highlights full scale;
4. scale the longest edge to the model's input size keeping the aspect ratio and
   centre it on the model's background.

An image already at the model's input size whose border is the model's background
(a Fashion-MNIST image, or the output of this function) is canonical already and is
returned unchanged: canonicalisation is idempotent and a no-op on native data.  A
blank or flat image has no object: it becomes an empty canvas, and its signals say so.

Every call also returns ``signals``: measurements of the raw image that the
out-of-distribution detector uses (how uniform the background is, how the object
fills its box, its contrast), because canonicalisation itself makes a face or a
digit look more like a garment.  The same function runs in training and in the
handler; its parameters live in the spec (``spec.canonical``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from handler.errors import SpecError

# Names of the raw-image signals, in the order of ``Canonical.signals``.
SIGNALS = (
    "border_uniformity",  # share of the border ring that is background (1.0: a clean backdrop)
    "border_noise",  # robust noise level of the background, in units of full intensity
    "box_fill",  # object pixels / bounding-box area
    "box_area",  # bounding-box area / image area
    "box_aspect",  # log(height / width) of the bounding box
    "contrast",  # object highlight minus background, in units of full intensity
    "touches_edges",  # how many image edges the object's box touches (0..4)
    "light_background",  # 1.0 when the background was light and the image was inverted
)


@dataclass(frozen=True)
class CanonicalSpec:
    """Settings of ``canonicalise`` (``spec.canonical``; null = no canonicalisation, resize per ``spec.resize``)."""

    tolerance: float = 0.05  # least difference from the background that counts as object (share of 255)
    noise_factor: float = 4.0  # ... or this many times the border's noise level, whichever is larger
    border: float = 0.04  # width of the border ring that estimates the background (share of the short side)
    # The mask is computed on a copy halved until its long side is under twice this (256: 256-511 pixels).
    analysis_size: int = 256
    # Uploads are decoded no larger than needed (handler.decode): a photo's long side is kept at least this
    # (JPEG DCT scaling, or an integer box reduction); the object's crop is taken at that resolution.
    decode_size: int = 256
    light_threshold: float = 0.5  # a background lighter than this (share of 255) is inverted

    def __post_init__(self) -> None:
        checks = {
            "tolerance": 0.0 < self.tolerance < 1.0,
            "noise_factor": self.noise_factor >= 0.0,
            "border": 0.0 < self.border <= 0.25,
            "analysis_size": isinstance(self.analysis_size, int) and self.analysis_size >= 32,
            "decode_size": isinstance(self.decode_size, int) and self.decode_size >= self.analysis_size,
            "light_threshold": 0.0 < self.light_threshold < 1.0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise SpecError(
                    f"canonical.{name} is out of range: {value!r} (tolerance in (0, 1), noise_factor >= 0, "
                    "border in (0, 0.25], analysis_size an integer >= 32, decode_size an integer >= analysis_size, "
                    "light_threshold in (0, 1))"
                )


@dataclass(frozen=True)
class Canonical:
    image: Image.Image  # in the model's mode, at the model's input size
    signals: tuple[float, ...]  # see SIGNALS
    passthrough: bool  # True when the input was canonical already


# The final resampling to the model's input: Pillow's Lanczos after an integer box reduction that stops at three
# times the target (reducing_gap=3): within 0.3 of a level of a plain Lanczos on average and several times cheaper.
REDUCING_GAP = 3.0
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _luminance(arr: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as Pillow's convert('L'), of an (..., 3) array; an (H, W) array is luma already."""
    if arr.ndim == 2 and arr.shape[-1] != 3:
        return arr
    return arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114


def _ring(arr: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a ring ``width`` wide along the image border, as (n, channels)."""
    h, w = arr.shape[:2]
    width = max(1, min(width, h // 2 or 1, w // 2 or 1))
    parts = [arr[:width], arr[h - width :], arr[width : h - width, :width], arr[width : h - width, w - width :]]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return np.concatenate([p.reshape(-1, channels) for p in parts if p.size])


def _median_of_counts(counts: np.ndarray) -> float:
    """``np.median`` of the integers whose histogram is ``counts`` (the two middle values averaged)."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    low = int(np.searchsorted(cumulative, (n - 1) // 2 + 1))
    high = int(np.searchsorted(cumulative, n // 2 + 1))
    return (low + high) / 2.0


def estimate_background(arr: np.ndarray, border: float) -> tuple[np.ndarray, float, np.ndarray]:
    """(background colour per channel, noise level, ring distances) from the border ring of an 8-bit image.

    The background is the most common luminance of the ring (16 bins), so an object
    that touches or crosses the border does not shift it; the noise level is the
    robust spread (1.4826 x MAD) of the ring pixels in that bin around it.  Medians come
    from histograms (8-bit values; distances on a half-level grid), exactly as ``np.median``.
    """
    ring = _ring(arr, round(border * min(arr.shape[:2])))
    channels = np.ascontiguousarray(ring.T)  # (C, n): reductions over a row are fast, over 3-wide rows slow
    lum = channels[0] if len(channels) == 1 else _LUMA @ channels.astype(np.float32)
    bins = np.minimum((lum * np.float32(1 / 16)).astype(np.int16), 15)
    mode = int(np.bincount(bins, minlength=16).argmax())
    near = np.abs(bins - mode) <= 1
    background = np.asarray([_median_of_counts(np.bincount(c[near], minlength=256)) for c in channels])
    # Distances on the half-level grid, doubled to integers: 2|v - b| = |2v - 2b|; the largest over channels.
    doubled = functools.reduce(np.maximum, (np.abs(2 * c.astype(np.int16) - int(2 * b)) for c, b in zip(channels, background)))
    noise = 1.4826 * _median_of_counts(np.bincount(doubled[near], minlength=511)) / 2.0
    return background, noise, doubled * 0.5


def _distance_to(arr: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``floor(|arr - background|)``, the largest over channels, for an 8-bit (H, W) or (H, W, C) array and a
    background of whole or half levels (what ``estimate_background`` gives): for ``b = k + 0.5`` it is
    ``min(|v - k|, |v - (k + 1)|)``, two saturating integer differences instead of float arithmetic."""
    low, high = np.floor(background), np.ceil(background)
    if not np.all((background - low) * 2 == np.rint((background - low) * 2)):
        raise ValueError(f"background must be in whole or half levels, got {background}")
    if arr.ndim == 2:
        lo, hi = float(low[0]), float(high[0])
    else:
        lo, hi = tuple(float(v) for v in low) + (0.0,), tuple(float(v) for v in high) + (0.0,)
    distance = cv2.absdiff(arr, lo)
    if not np.array_equal(low, high):
        distance = cv2.min(distance, cv2.absdiff(arr, hi))
    if distance.ndim == 3:
        channels = cv2.split(distance)
        distance = channels[0] if len(channels) == 1 else cv2.max(cv2.max(channels[0], channels[1]), channels[2])
    return distance


def _analysis_copy(arr: np.ndarray, size: int) -> np.ndarray:
    """The decoded image halved (2x2 area averages) until its long side is under ``2 * size``.

    Halving is exact and cheap (a resampling to an arbitrary size costs several times more), and a
    decoded photo usually needs none: ``handler.decode`` already brought it under ``2 * decode_size``."""
    while max(arr.shape[:2]) >= 2 * size:
        h, w = arr.shape[:2]
        arr = cv2.resize(arr, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    return arr


def _distance(arr: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel, the largest channel difference from the background, as 8-bit levels (truncated).

    Median-filtered (3x3) on images of at least 8 pixels a side, so JPEG artefacts and sensor
    noise do not count; tiny images are kept intact (and their distances exact)."""
    if min(arr.shape[:2]) < 8:
        diff = np.abs(arr.astype(np.float32) - background.astype(np.float32))
        return diff.max(axis=2) if arr.ndim == 3 else diff
    distance = _distance_to(arr, background)
    return cv2.medianBlur(distance, 3)


def _object_box(arr: np.ndarray, background: np.ndarray, threshold: float) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Object mask (median-filtered distance above threshold) and its bounding box (left, top, right, bottom)."""
    distance = _distance(arr, background)
    # 8-bit distances: d > t exactly when d > floor(t), and an integer comparison is cheaper.
    mask = distance > (int(np.floor(threshold)) if distance.dtype == np.uint8 else threshold)
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0 or h == 0:
        return mask, None
    return mask, (x, y, x + w, y + h)


def _full_resolution_box(full: np.ndarray, box, analysis_size: tuple[int, int], background: np.ndarray,
                         threshold: float) -> tuple[int, int, int, int]:
    """The object's box in the decoded image: the analysis box scaled up, then found again at the decoded
    resolution inside it (plus a margin), so where the object sits in the frame does not move the crop."""
    h, w = full.shape[:2]
    factor_x, factor_y = w / analysis_size[0], h / analysis_size[1]
    if factor_x == factor_y == 1.0:
        return box
    left, top, right, bottom = box
    outer = (max(0, int(np.floor((left - 1) * factor_x))), max(0, int(np.floor((top - 1) * factor_y))),
             min(w, int(np.ceil((right + 1) * factor_x))), min(h, int(np.ceil((bottom + 1) * factor_y))))
    _, inner = _object_box(full[outer[1] : outer[3], outer[0] : outer[2]], background, threshold)
    if inner is None:
        return outer
    return (outer[0] + inner[0], outer[1] + inner[1], outer[0] + inner[2], outer[1] + inner[3])


def _place(crop: Image.Image, size: tuple[int, int], fill) -> Image.Image:
    """Scale ``crop`` so its longest edge fits ``size`` (height, width) and centre it on ``fill``."""
    height, width = size
    w, h = crop.size
    scale = min(width / w, height / h)
    new_w, new_h = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    fitted = crop.resize((new_w, new_h), Image.LANCZOS, reducing_gap=REDUCING_GAP) if (new_w, new_h) != (w, h) else crop
    canvas = Image.new(crop.mode, (width, height), fill)
    canvas.paste(fitted, ((width - new_w + 1) // 2, (height - new_h + 1) // 2))  # odd margins: one more on the left/top, as Fashion-MNIST
    return canvas


def _percentile_of_distance(values: np.ndarray, centre: float, q: float, mask: np.ndarray | None = None) -> float:
    """``np.percentile(np.abs(values[mask] - centre), q)`` for 8-bit ``values``, from their histogram: exact
    (the same order statistics and the same linear interpolation) without sorting every pixel; 0.0 if none."""
    mask = None if mask is None else mask.view(np.uint8)
    counts = cv2.calcHist([np.ascontiguousarray(values)], [0], mask, [256], [0, 256]).ravel().astype(np.int64)
    present = np.flatnonzero(counts)
    if not len(present):
        return 0.0
    distances = np.abs(present.astype(np.float32) - np.float32(centre))
    order = np.argsort(distances, kind="stable")
    distances, cumulative = distances[order], np.cumsum(counts[present][order])
    rank = q / 100.0 * (int(cumulative[-1]) - 1)
    lower, upper = int(np.floor(rank)), int(np.ceil(rank))
    low, high = distances[np.searchsorted(cumulative, lower + 1)], distances[np.searchsorted(cumulative, upper + 1)]
    return float(low + (high - low) * (rank - lower))


def _levels(crop: np.ndarray, crop_bg, light: bool, target_bg: np.ndarray, mode: str) -> np.ndarray:
    """Invert a light background, then stretch: the background becomes the model's background, the object's
    highlights (99.5th percentile of the difference) full scale.  8-bit 'L' crops go through a lookup table
    computed with the same float32 arithmetic as the per-pixel form (identical output, a fraction of the work)."""
    if mode == "L":
        values = np.arange(256, dtype=np.float32)
        bg = np.float32(crop_bg)
        # |(255 - v) - (255 - bg)| = |v - bg|: the span is the same whether or not the crop is inverted.
        span = max(_percentile_of_distance(crop, float(bg), 99.5), 1.0)
        if light:
            values, bg = np.float32(255.0) - values, np.float32(255.0) - bg
        table = np.clip((values - bg) / np.float32(span), 0.0, 1.0) * np.float32(255.0)
        table = target_bg[0] + table * (np.float32(255.0) - target_bg[0]) / np.float32(255.0)
        return cv2.LUT(crop, np.clip(np.rint(table), 0, 255).astype(np.uint8))
    crop = crop.astype(np.float32)
    if light:
        crop, crop_bg = 255.0 - crop, 255.0 - crop_bg
    span = max(float(np.percentile(np.abs(crop - crop_bg), 99.5)), 1.0)
    levels = np.clip((crop - crop_bg) / span, 0.0, 1.0) * 255.0
    levels = target_bg + levels * (255.0 - target_bg) / 255.0
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8)


def canonicalise(img: Image.Image, params: CanonicalSpec, input_size: tuple[int, int],
                 mode: str, background: tuple[int, ...]) -> Canonical:
    """Bring ``img`` ('L' or 'RGB') into the training distribution; see the module docstring.

    ``input_size`` is the model's (height, width), ``mode`` 'L' or 'RGB' and
    ``background`` the model's background colour (0..255 per channel).  ``img`` is whatever
    ``handler.decode`` made of the upload (already reduced to ``params.decode_size``): no step
    here looks at more pixels than that.
    """
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    height, width = input_size
    full = np.asarray(img)
    arr = _analysis_copy(full, params.analysis_size)
    bg, noise, ring_distance = estimate_background(arr, params.border)
    threshold = max(params.tolerance * 255.0, params.noise_factor * noise)
    mask, box = _object_box(arr, bg, threshold)

    bg_lum = float(_luminance(bg.reshape(1, -1)).item()) if bg.size == 3 else float(bg[0])
    light = bg_lum > params.light_threshold * 255.0
    model_bg = np.asarray(background, dtype=np.float32)
    target_bg = model_bg if img.mode == mode else np.asarray([float(_luminance(model_bg.reshape(1, -1)).item())],
                                                              dtype=np.float32)
    signals = {
        "border_uniformity": float((ring_distance <= threshold).mean()),
        "border_noise": noise / 255.0,
        "light_background": float(light),
    }
    if box is None:
        signals.update(box_fill=0.0, box_area=0.0, box_aspect=0.0, contrast=0.0, touches_edges=0.0)
        fill = background[0] if mode == "L" else tuple(background)
        return Canonical(Image.new(mode, (width, height), fill), _ordered(signals), False)

    left, top, right, bottom = box
    sh, sw = mask.shape
    inside = mask[top:bottom, left:right]
    signals.update(
        box_fill=float(inside.mean()),
        box_area=float(inside.size / mask.size),
        box_aspect=float(np.log((bottom - top) / (right - left))),
        touches_edges=float((left == 0) + (top == 0) + (right == sw) + (bottom == sh)),
    )
    lum = arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    signals["contrast"] = _percentile_of_distance(lum, bg_lum, 99.5, mask) / 255.0

    if img.size == (width, height) and np.all(np.abs(bg - target_bg) <= params.tolerance * 255.0):
        # Already canonical: the model's size on the model's background (Fashion-MNIST itself).
        return Canonical(img if img.mode == mode else img.convert(mode), _ordered(signals), True)

    crop = np.asarray(img.crop(_full_resolution_box(full, box, (sw, sh), bg, threshold)).convert(mode))
    leveled = Image.fromarray(_levels(crop, bg_lum if mode == "L" else bg, light, target_bg, mode))
    fill = background[0] if mode == "L" else tuple(background)
    return Canonical(_place(leveled, input_size, fill), _ordered(signals), False)


def _ordered(signals: dict[str, float]) -> tuple[float, ...]:
    return tuple(float(signals[name]) for name in SIGNALS)
