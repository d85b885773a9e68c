"""Canonicalisation: bring a photo of an object into the training distribution.

Fashion-MNIST was made from product photos (Xiao, Rasul & Vollgraf 2017, section 2):
trim the edges close to the corner colour, scale the longest edge to 28, centre on
the canvas, negate, 8-bit grayscale.  ``canonicalise`` does the same, generalised
to the photos users send:

1. find the object (``handler.segment.find``, on the decoder's reduced copy): a background model
   fitted to the border that handles light gradients and textured surfaces (a smooth surface, its
   tones and its spread), the pixels that differ from it by more than its noise and texture, and the
   object chosen among those regions (the largest and its neighbours; tags, text, a hook left out);
2. crop to the object's box;
3. turn the crop into the model's mode: for a grey model, the colour distance from the background
   under the object's soft mask (so a navy shirt on a grey sheet or a white one on cream keeps its
   shape), stretched so the background becomes the model's background and the object's highlights
   full scale (light garments on black, as the model was trained);
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

import cv2
import numpy as np
from PIL import Image

from handler import segment
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
    "background_spread",  # the background's texture: its spread around its model, in units of full intensity
    "background_tones",  # how many tones the background has (0: one colour or one smooth surface; 2-3: planks, checks)
    "dropped_share",  # share of the differing pixels left out of the object (clutter, or a scene with no one object)
    "solidity",  # object pixels / the area of their convex hull (a garment is solid; strokes and scraps are not)
)


@dataclass(frozen=True)
class CanonicalSpec:
    """Settings of ``canonicalise`` (``spec.canonical``; null = no canonicalisation, resize per ``spec.resize``)."""

    tolerance: float = 0.05  # least difference from the background that counts as object (share of 255)
    noise_factor: float = 4.0  # ... or this many times the border's noise level, whichever is larger
    spread_factor: float = 2.0  # ... or this many times the background's spread (its texture), whichever is largest
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
            "spread_factor": self.spread_factor >= 0.0,
            "border": 0.0 < self.border <= 0.25,
            "analysis_size": isinstance(self.analysis_size, int) and self.analysis_size >= 32,
            "decode_size": isinstance(self.decode_size, int) and self.decode_size >= self.analysis_size,
            "light_threshold": 0.0 < self.light_threshold < 1.0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise SpecError(
                    f"canonical.{name} is out of range: {value!r} (tolerance in (0, 1), noise_factor and spread_factor >= 0, "
                    "border in (0, 0.25], analysis_size an integer >= 32, decode_size an integer >= analysis_size, "
                    "light_threshold in (0, 1))"
                )


@dataclass(frozen=True)
class Canonical:
    image: Image.Image  # in the model's mode, at the model's input size
    signals: tuple[float, ...]  # see SIGNALS
    passthrough: bool  # True when the input was canonical already
    # The region the object was taken from, as shares of the image's width and height (left, top, right, bottom);
    # None when no object was found.
    region: tuple[float, float, float, float] | None = None


# The final resampling to the model's input: Pillow's Lanczos after an integer box reduction that stops at three
# times the target (reducing_gap=3): within 0.3 of a level of a plain Lanczos on average and several times cheaper.
REDUCING_GAP = 3.0
# The crop is brought to at most this many times the model's input before its grey is computed.
GREY_SCALE = 4
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _luminance(arr: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as Pillow's convert('L'), of an (..., 3) array; an (H, W) array is luma already."""
    if arr.ndim == 2 and arr.shape[-1] != 3:
        return arr
    return arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114


def _analysis_copy(arr: np.ndarray, size: int) -> np.ndarray:
    """The decoded image halved (2x2 area averages) until its long side is under ``2 * size``.

    Halving is exact and cheap (a resampling to an arbitrary size costs several times more), and a
    decoded photo usually needs none: ``handler.decode`` already brought it under ``2 * decode_size``."""
    while max(arr.shape[:2]) >= 2 * size:
        h, w = arr.shape[:2]
        arr = cv2.resize(arr, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    return arr


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


def _grey(crop: np.ndarray, surface: np.ndarray, weight: np.ndarray, target_bg: float) -> np.ndarray:
    """The object as the model sees it in grayscale: each pixel's colour distance from the background
    (largest channel difference, so a mustard shirt on white is as visible as a navy one), weighted by the
    object's soft mask (the texture around it goes to the background), stretched so the object's highlights
    (99.5th percentile) are full scale, over the model's background level."""
    distance = cv2.absdiff(crop.reshape(surface.shape), surface)
    if distance.ndim == 3 and distance.shape[2] == 3:
        c = cv2.split(distance)
        distance = cv2.max(cv2.max(c[0], c[1]), c[2])
    distance = distance.reshape(weight.shape)
    span = max(_percentile_of_distance(distance, 0.0, 99.5, weight > 0.5), 1.0)
    levels = np.minimum(distance.astype(np.float32) * (weight / np.float32(span)), 1.0) * np.float32(255.0)
    return np.clip(np.rint(target_bg + levels * np.float32((255.0 - target_bg) / 255.0)), 0, 255).astype(np.uint8)


def _colour(crop: np.ndarray, surface: np.ndarray, weight: np.ndarray, light: bool, target_bg: np.ndarray) -> np.ndarray:
    """An RGB model's view: the crop's difference from the background per channel (inverted on a light
    background), stretched so the highlights are full scale, weighted by the soft mask, over the model's background."""
    diff = (surface - crop.astype(np.float32)) if light else (crop.astype(np.float32) - surface)
    span = max(float(np.percentile(np.abs(diff[weight > 0.5]), 99.5)) if (weight > 0.5).any() else 0.0, 1.0)
    levels = np.clip(diff / span, 0.0, 1.0) * 255.0 * weight[..., None]
    return np.clip(np.rint(target_bg + levels * (255.0 - target_bg) / 255.0), 0, 255).astype(np.uint8)


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
    found = segment.find(arr, params.tolerance, params.noise_factor, params.spread_factor, params.border)
    bg = found.background
    bg_lum = float(_LUMA @ bg.colour.astype(np.float32)) if bg.colour.size == 3 else float(bg.colour[0])
    light = bg_lum > params.light_threshold * 255.0
    model_bg = np.asarray(background, dtype=np.float32)
    target_bg = model_bg if img.mode == mode else np.asarray([float(_luminance(model_bg.reshape(1, -1)).item())],
                                                              dtype=np.float32)
    signals = {
        "border_uniformity": float((bg.ring_distance <= found.threshold).mean()),
        "border_noise": bg.noise / 255.0,
        "light_background": float(light),
        "background_spread": bg.spread / 255.0,
        "background_tones": float(0 if bg.tones is None else len(bg.tones)),
        "dropped_share": float(found.dropped),
    }
    fill = background[0] if mode == "L" else tuple(background)
    if found.box is None:
        signals.update(box_fill=0.0, box_area=0.0, box_aspect=0.0, contrast=0.0, touches_edges=0.0, solidity=0.0)
        return Canonical(Image.new(mode, (width, height), fill), _ordered(signals), False)

    mask = found.mask
    left, top, right, bottom = found.box
    sh, sw = mask.shape
    inside = mask[top:bottom, left:right]
    signals.update(
        box_fill=float(inside.mean()),
        box_area=float(inside.size / mask.size),
        box_aspect=float(np.log((bottom - top) / (right - left))),
        touches_edges=float((left == 0) + (top == 0) + (right == sw) + (bottom == sh)),
        solidity=segment.solidity(mask),
    )
    lum = arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    signals["contrast"] = _percentile_of_distance(lum, bg_lum, 99.5, mask) / 255.0
    region = (left / sw, top / sh, right / sw, bottom / sh)

    if img.size == (width, height) and np.all(np.abs(bg.colour - target_bg) <= params.tolerance * 255.0):
        # Already canonical: the model's size on the model's background (Fashion-MNIST itself).
        return Canonical(img if img.mode == mode else img.convert(mode), _ordered(signals), True, region)

    w, h = img.size
    box = (int(np.floor(region[0] * w)), int(np.floor(region[1] * h)), int(np.ceil(region[2] * w)), int(np.ceil(region[3] * h)))
    crop = full[box[1] : box[3], box[0] : box[2]]
    # Reduced to at most GREY_SCALE x the model's input before the per-pixel work: the result is resampled to
    # the input size anyway, and averaging first also averages out a fabric's weave.
    limit = GREY_SCALE * max(input_size)
    if max(crop.shape[:2]) > limit:
        f = limit / max(crop.shape[:2])
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * f)), max(1, round(crop.shape[0] * f))),
                          interpolation=cv2.INTER_AREA)
    ch, cw = crop.shape[:2]
    window = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    surface = bg.surface((ch, cw), window, as_uint8=mode == "L")
    # The object's mask over the crop, soft at its edge (one analysis pixel), so texture outside it fades out.
    weight = cv2.resize(mask[top:bottom, left:right].astype(np.float32), (cw, ch), interpolation=cv2.INTER_LINEAR)
    if min(sh, sw) >= segment.SMALL:
        k = max(3, (int(round(cw / max(right - left, 1))) * 2) | 1)
        weight = cv2.GaussianBlur(weight, (k, k), 0)
    else:
        weight = np.ones_like(weight)  # a small image: no region choice, every pixel counts
    if mode == "L":
        leveled = Image.fromarray(_grey(crop, surface, weight, float(target_bg[0])))
    else:
        leveled = Image.fromarray(_colour(crop, surface, weight, light, target_bg))
    return Canonical(_place(leveled, input_size, fill), _ordered(signals), False, region)


def _ordered(signals: dict[str, float]) -> tuple[float, ...]:
    return tuple(float(signals[name]) for name in SIGNALS)
