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

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

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
    analysis_size: int = 256  # the mask is computed on a copy whose long side is at most this
    light_threshold: float = 0.5  # a background lighter than this (share of 255) is inverted

    def __post_init__(self) -> None:
        checks = {
            "tolerance": 0.0 < self.tolerance < 1.0,
            "noise_factor": self.noise_factor >= 0.0,
            "border": 0.0 < self.border <= 0.25,
            "analysis_size": isinstance(self.analysis_size, int) and self.analysis_size >= 32,
            "light_threshold": 0.0 < self.light_threshold < 1.0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise SpecError(
                    f"canonical.{name} is out of range: {value!r} (tolerance in (0, 1), noise_factor >= 0, "
                    "border in (0, 0.25], analysis_size an integer >= 32, light_threshold in (0, 1))"
                )


@dataclass(frozen=True)
class Canonical:
    image: Image.Image  # in the model's mode, at the model's input size
    signals: tuple[float, ...]  # see SIGNALS
    passthrough: bool  # True when the input was canonical already


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


def estimate_background(arr: np.ndarray, border: float) -> tuple[np.ndarray, float, np.ndarray]:
    """(background colour per channel, noise level, ring distances) from the border ring.

    The background is the most common luminance of the ring (16 bins), so an object
    that touches or crosses the border does not shift it; the noise level is the
    robust spread (1.4826 x MAD) of the ring pixels in that bin around it.
    """
    ring = _ring(arr, round(border * min(arr.shape[:2])))
    lum = ring[:, 0] if ring.shape[1] == 1 else _luminance(ring)
    bins = np.minimum((lum / 16.0).astype(np.int64), 15)
    mode = int(np.bincount(bins, minlength=16).argmax())
    in_mode = ring[(bins >= mode - 1) & (bins <= mode + 1)]
    background = np.median(in_mode, axis=0)
    distance = np.abs(ring - background).max(axis=1)
    noise = 1.4826 * float(np.median(np.abs(distance[np.abs(bins - mode) <= 1])))
    return background, noise, distance


def _analysis_copy(img: Image.Image, size: int) -> tuple[Image.Image, float]:
    """A copy no larger than ``size`` on its long side (box-filtered), and the scale back to the original."""
    w, h = img.size
    factor = max(w, h) / size
    if factor <= 1.0:
        return img, 1.0
    small = img.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BOX)
    return small, factor


def _object_box(arr: np.ndarray, background: np.ndarray, threshold: float) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Object mask (median-filtered distance above threshold) and its bounding box (left, top, right, bottom)."""
    distance = np.abs(arr - background).max(axis=2) if arr.ndim == 3 else np.abs(arr - background[0])
    if min(distance.shape) >= 8:  # suppress isolated noise and JPEG speckle; keeps tiny images intact
        dist_img = Image.fromarray(np.clip(distance, 0, 255).astype(np.uint8), mode="L")
        distance = np.asarray(dist_img.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    mask = distance > threshold
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return mask, None
    return mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _full_resolution_box(img: Image.Image, box, analysis_size: tuple[int, int], background: np.ndarray,
                         threshold: float) -> tuple[int, int, int, int]:
    """The object's box in the full image: the analysis box scaled up, then found again at full
    resolution inside it (plus a margin), so where the object sits in the frame does not move the crop."""
    factor_x, factor_y = img.size[0] / analysis_size[0], img.size[1] / analysis_size[1]
    if factor_x == factor_y == 1.0:
        return box
    left, top, right, bottom = box
    outer = (max(0, int(np.floor((left - 1) * factor_x))), max(0, int(np.floor((top - 1) * factor_y))),
             min(img.size[0], int(np.ceil((right + 1) * factor_x))), min(img.size[1], int(np.ceil((bottom + 1) * factor_y))))
    _, inner = _object_box(np.asarray(img.crop(outer), dtype=np.float32), background, threshold)
    if inner is None:
        return outer
    return (outer[0] + inner[0], outer[1] + inner[1], outer[0] + inner[2], outer[1] + inner[3])


def _place(crop: Image.Image, size: tuple[int, int], fill) -> Image.Image:
    """Scale ``crop`` so its longest edge fits ``size`` (height, width) and centre it on ``fill``."""
    height, width = size
    w, h = crop.size
    scale = min(width / w, height / h)
    new_w, new_h = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    fitted = crop.resize((new_w, new_h), Image.LANCZOS) if (new_w, new_h) != (w, h) else crop
    canvas = Image.new(crop.mode, (width, height), fill)
    canvas.paste(fitted, ((width - new_w + 1) // 2, (height - new_h + 1) // 2))  # odd margins: one more on the left/top, as Fashion-MNIST
    return canvas


def canonicalise(img: Image.Image, params: CanonicalSpec, input_size: tuple[int, int],
                 mode: str, background: tuple[int, ...]) -> Canonical:
    """Bring ``img`` ('L' or 'RGB') into the training distribution; see the module docstring.

    ``input_size`` is the model's (height, width), ``mode`` 'L' or 'RGB' and
    ``background`` the model's background colour (0..255 per channel).
    """
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    height, width = input_size
    small, _ = _analysis_copy(img, params.analysis_size)
    arr = np.asarray(small, dtype=np.float32)
    bg, noise, ring_distance = estimate_background(arr, params.border)
    threshold = max(params.tolerance * 255.0, params.noise_factor * noise)
    mask, box = _object_box(arr, bg, threshold)

    bg_lum = float(_luminance(bg.reshape(1, -1)).item()) if bg.size == 3 else float(bg[0])
    light = bg_lum > params.light_threshold * 255.0
    model_bg = np.asarray(background, dtype=np.float32)
    target_bg = model_bg if img.mode == mode else np.asarray([float(_luminance(model_bg.reshape(1, -1)).item())])
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
    lum = arr if arr.ndim == 2 else _luminance(arr)
    highlight = np.percentile(np.abs(lum[mask] - bg_lum), 99.5) if mask.any() else 0.0
    signals["contrast"] = float(highlight) / 255.0

    if img.size == (width, height) and np.all(np.abs(bg - target_bg) <= params.tolerance * 255.0):
        # Already canonical: the model's size on the model's background (Fashion-MNIST itself).
        return Canonical(img if img.mode == mode else img.convert(mode), _ordered(signals), True)

    crop = np.asarray(img.crop(_full_resolution_box(img, box, (sw, sh), bg, threshold)).convert(mode), dtype=np.float32)
    crop_bg = bg_lum if mode == "L" else bg
    if light:
        crop, crop_bg = 255.0 - crop, 255.0 - crop_bg
    # Levels: the background becomes 0 (then the model's background), the highlights full scale.
    span = max(float(np.percentile(np.abs(crop - crop_bg), 99.5)), 1.0)
    levels = np.clip((crop - crop_bg) / span, 0.0, 1.0) * 255.0
    if mode == "L":
        levels = target_bg[0] + levels * (255.0 - target_bg[0]) / 255.0
    else:
        levels = target_bg + levels * (255.0 - target_bg) / 255.0
    leveled = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), mode=mode)
    fill = background[0] if mode == "L" else tuple(background)
    return Canonical(_place(leveled, input_size, fill), _ordered(signals), False)


def _ordered(signals: dict[str, float]) -> tuple[float, ...]:
    return tuple(float(signals[name]) for name in SIGNALS)
