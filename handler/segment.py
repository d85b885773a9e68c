"""Find the object in a photo: a background model that handles texture and light, and the object chosen
among the regions that differ from it.  The first half of canonicalisation (``handler.canonical``).

``find(arr, params)`` works on the analysis copy (an 8-bit 'L' or 'RGB' array of 256-511 pixels on its
long side for a photo; the image itself when it is smaller):

1. **Background.** A smooth surface per channel (a quadratic in x and y) fitted to the border ring by
   robust least squares: ring pixels far from the fit (an object touching or crossing the edge, a tag in
   a corner) are trimmed and the fit repeated, so light gradients, vignetting and a tinted backdrop are
   part of the background; once the object is found, the surface is fitted again on everything else (a
   grid over the whole image) and the object found again, so light that falls unevenly inside the frame
   is background too.  Its **spread** is a high quantile of how far the remaining ring pixels lie
   from it: the grain of a wooden floor, the weave of a fabric, the folds of a sheet.  A backdrop whose
   ring is flat is modelled as one colour (no surface is evaluated: the common case costs nothing more).
2. **Difference.** Every pixel's distance from the background (the largest channel difference, on a copy
   smoothed over about 1 % of the image so that a weave or grain averages out), median-filtered.
3. **Regions.** The pixels whose distance exceeds ``max(tolerance, noise_factor x noise,
   spread_factor x spread)``, opened (thin strokes go: a price tag's string, a hanger's wire, text) and
   closed.
4. **The object.** The largest region, and every other region at least ``part_share`` of its size that
   lies next to it (a garment's parts); small regions elsewhere (tags, text, a coin, a hook) are left out.

Everything is 8-bit or float32 OpenCV and numpy on the analysis copy, so a phone photo costs about as
much as a catalogue one.  The same function runs in training and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
_TRIM_PASSES = 2  # robust refits of the background surface
_FIT_POINTS = 600  # ring pixels the surface is fitted to
_GRID = 40  # the refit samples a 40 x 40 grid of the image
_TONE_SHARE = 0.15  # a background tone holds at least this share of the sampled background
_FLAT = 6.0  # a ring whose pixels lie this close to one colour (90th percentile, levels) is a flat backdrop
SMALL = 48  # images with a side under this (natives, thumbnails) have one background colour and no region choice


@dataclass(frozen=True)
class Background:
    colour: np.ndarray  # (C,) float: the background at the ring's median (the colour a flat backdrop has)
    coefficients: np.ndarray | None  # (6, C) quadratic surface in normalised coordinates; None: flat
    noise: float  # robust noise level of the ring around the background (1.4826 x MAD), levels
    spread: float  # a high quantile of the ring's distance from the background, levels
    ring_distance: np.ndarray  # each ring pixel's distance from the background, levels
    # Tones of a background made of several (a wooden floor's planks, a check pattern), as offsets from the
    # surface, (K, C) levels; None: the surface alone.
    tones: np.ndarray | None = None

    def surface(self, shape: tuple[int, int], window: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
                as_uint8: bool = False) -> np.ndarray:
        """The background over an (h, w) grid covering ``window`` (left, top, right, bottom as shares of the
        image): (h, w, C) float32.  A flat background is its colour everywhere; a quadratic is evaluated on a
        grid of at most 32 x 32 points and interpolated (bilinear), which a surface this smooth allows."""
        h, w = shape
        channels = len(self.colour)
        if self.coefficients is None:
            colour = np.clip(np.rint(self.colour), 0, 255).astype(np.uint8) if as_uint8 else self.colour.astype(np.float32)
            return np.broadcast_to(colour, (h, w, channels))
        gh, gw = min(h, 32), min(w, 32)
        left, top, right, bottom = window
        x = (left + (np.arange(gw, dtype=np.float32) + 0.5) / gw * (right - left)) * 2 - 1
        y = (top + (np.arange(gh, dtype=np.float32) + 0.5) / gh * (bottom - top)) * 2 - 1
        grid = np.empty((gh, gw, channels), dtype=np.float32)
        for c in range(channels):
            k = self.coefficients[:, c].astype(np.float32)
            grid[..., c] = (k[0] + k[1] * x + k[3] * x * x)[None, :] + (k[2] * y + k[5] * y * y)[:, None] + k[4] * np.outer(y, x)
        if as_uint8:
            grid = np.clip(np.rint(grid), 0, 255).astype(np.uint8)
        if (gh, gw) == (h, w):
            return grid
        return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, channels)


@dataclass(frozen=True)
class Found:
    mask: np.ndarray  # (h, w) bool: the object's pixels on the analysis copy
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) on the analysis copy; None: nothing found
    background: Background
    threshold: float  # the distance above which a pixel differed from the background
    distance: np.ndarray  # (h, w) uint8: each pixel's distance from the background
    dropped: float  # share of the differing pixels left out (small regions away from the object)


def _ring(arr: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a ring ``width`` wide along the border, as (n, C)."""
    h, w = arr.shape[:2]
    width = max(1, min(width, h // 2 or 1, w // 2 or 1))
    parts = [arr[:width], arr[h - width :], arr[width : h - width, :width], arr[width : h - width, w - width :]]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return np.concatenate([p.reshape(-1, channels) for p in parts if p.size])


def _ring_samples(h: int, w: int, width: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of about ``count`` points spread evenly over a ring ``width`` wide along the border."""
    width = max(1, min(width, h // 2 or 1, w // 2 or 1))
    depths = sorted({0, (width - 1) // 2, width - 1})
    along = max(2, count // (4 * len(depths)))
    xs, ys = np.linspace(0, w - 1, along).astype(np.int64), np.linspace(0, h - 1, along).astype(np.int64)
    rows, cols = [], []
    for d in depths:
        rows += [np.full(along, d), np.full(along, h - 1 - d), ys, ys]
        cols += [xs, xs, np.full(along, d), np.full(along, w - 1 - d)]
    return np.concatenate(rows), np.concatenate(cols)


def _median_of_counts(counts: np.ndarray) -> float:
    """``np.median`` of the integers whose histogram is ``counts`` (the two middle values averaged)."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    low = int(np.searchsorted(cumulative, (n - 1) // 2 + 1))
    high = int(np.searchsorted(cumulative, n // 2 + 1))
    return (low + high) / 2.0


def _basis(rows: np.ndarray, cols: np.ndarray, h: int, w: int) -> np.ndarray:
    x = (cols.astype(np.float32) + 0.5) / w * 2 - 1
    y = (rows.astype(np.float32) + 0.5) / h * 2 - 1
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def background_model(arr: np.ndarray, border: float) -> Background:
    """The background of an 8-bit (h, w) or (h, w, C) image, from its border ring (see the module docstring)."""
    h, w = arr.shape[:2]
    width = round(border * min(h, w))
    ring = _ring(arr, width)  # (n, C) uint8
    channels = np.ascontiguousarray(ring.T)
    lum = channels[0] if len(channels) == 1 else _LUMA @ channels.astype(np.float32)
    # The colour: the median of the ring pixels around its most common luminance (16 bins), so an object
    # crossing the edge does not shift it.
    bins = np.minimum((lum * np.float32(1 / 16)).astype(np.int16), 15)
    mode = int(np.bincount(bins, minlength=16).argmax())
    near = np.abs(bins - mode) <= 1
    colour = np.asarray([_median_of_counts(np.bincount(c[near], minlength=256)) for c in channels])
    # Distances on the half-level grid, doubled to integers: 2|v - b| = |2v - 2b|; the largest over channels.
    doubled = np.abs(2 * channels.astype(np.int16) - (2 * colour).astype(np.int16)[:, None]).max(axis=0)
    near_counts = np.bincount(doubled[near], minlength=511)
    noise = 1.4826 * _median_of_counts(near_counts) / 2.0
    flat_spread = _quantile_of_counts(near_counts, 0.9) / 2.0
    flat_distance = doubled * 0.5
    flat = Background(colour, None, noise, flat_spread, flat_distance)
    if min(h, w) < SMALL or flat_spread <= _FLAT:
        return flat  # a native image or a thumbnail, or a clean backdrop: one colour describes it

    # The surface: robust least squares of a quadratic on a few hundred ring pixels (plenty for 6 terms).
    rows, cols = _ring_samples(h, w, width, _FIT_POINTS)
    surface = _fit_surface(arr, rows, cols)
    if surface is None:
        return flat
    coefficients, noise_around, spread, distance, signed = surface
    tones, spread = _tones(signed, spread)
    if tones is None and spread >= flat_spread * 0.9:
        return flat  # the surface explains no more than one colour does
    if tones is not None:  # each sampled ring pixel's distance from the nearest tone
        distance = np.min([_channel_max(np.abs(signed - t)) for t in tones], axis=0)
    # The sampled ring pixels' distances from the background: the share of the border that is background.
    return Background(colour, coefficients, noise_around, spread, distance, tones)


def _fit_surface(arr: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """A quadratic per channel through the pixels at (rows, cols), by robust least squares (the 6x6 normal
    equations, refitted without the points far from the fit): (coefficients (6, C), the noise around it
    (1.4826 x MAD), its spread (90th percentile of the inliers' distance), every point's distance), or None."""
    h, w = arr.shape[:2]
    basis, values = _basis(rows, cols, h, w), arr[rows, cols].reshape(len(rows), -1).astype(np.float32)
    keep = np.ones(len(values), dtype=bool)
    coefficients, residual = None, None
    for _ in range(_TRIM_PASSES + 1):
        if keep.sum() < 12:
            break
        b = basis[keep]
        try:
            coefficients = np.linalg.solve(b.T @ b + 1e-6 * np.eye(6, dtype=np.float32), b.T @ values[keep])
        except np.linalg.LinAlgError:
            return None
        residual = _channel_max(np.abs(values - basis @ coefficients))
        scale = 1.4826 * float(np.median(residual[keep]))
        keep = residual <= max(3.0 * scale + 3.0, 6.0)
    if coefficients is None or not keep.any():
        return None
    noise = 1.4826 * float(np.median(residual[keep]))
    return coefficients.astype(np.float64), noise, float(np.quantile(residual[keep], 0.9)), residual, \
        values - basis @ coefficients


def _tones(signed: np.ndarray, spread: float) -> tuple[np.ndarray | None, float]:
    """The background's tones, when the points around the surface fall into several groups (k-means, 3 groups,
    each kept when it holds at least ``_TONE_SHARE`` of the points): (offsets (K, C), the spread around the
    nearest tone), or (None, ``spread``) when one tone describes them."""
    if len(signed) < 30 or spread <= _FLAT:
        return None, spread
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)  # k-means++ draws its first centres: the same every call
    _, labels, centres = cv2.kmeans(signed.astype(np.float32), 3, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    shares = np.bincount(labels.ravel(), minlength=3) / len(labels)
    kept = centres[shares >= _TONE_SHARE]
    nearest = np.min([_channel_max(np.abs(signed - c)) for c in kept], axis=0)
    tone_spread = float(np.quantile(nearest, 0.9))
    if len(kept) < 2 or tone_spread >= 0.8 * spread:
        return None, spread  # several tones explain no more than one does
    return kept.astype(np.float32), tone_spread


def refit(arr: np.ndarray, background: Background, exclude: np.ndarray) -> Background:
    """The surface fitted again on the whole image's background (a grid of points outside ``exclude``, the object
    dilated), so light that falls unevenly inside the frame, unseen by the border, is background too."""
    h, w = arr.shape[:2]
    ys, xs = np.linspace(0, h - 1, _GRID).astype(np.int64), np.linspace(0, w - 1, _GRID).astype(np.int64)
    rows, cols = np.repeat(ys, len(xs)), np.tile(xs, len(ys))
    outside = ~exclude[rows, cols]
    if outside.sum() < _GRID:
        return background
    surface = _fit_surface(arr, rows[outside], cols[outside])
    if surface is None:
        return background
    coefficients, noise, spread, _, signed = surface
    tones, spread = _tones(signed, spread)
    return Background(background.colour, coefficients, noise, spread, background.ring_distance, tones)


def _channel_max(values: np.ndarray) -> np.ndarray:
    """The largest of each row's 1 or 3 values ((n, C) -> (n,)), without numpy's slow reduction over a short axis."""
    if values.shape[1] == 1:
        return values[:, 0]
    return np.maximum(np.maximum(values[:, 0], values[:, 1]), values[:, 2])


def _quantile_of_counts(counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile (lower value) of the integers whose histogram is ``counts``."""
    cumulative = np.cumsum(counts)
    return float(np.searchsorted(cumulative, q * cumulative[-1]))


def smoothed(arr: np.ndarray) -> np.ndarray:
    """``arr`` box-filtered over ~1 % of the image, so a weave or a grain averages out before a comparison."""
    k = max(3, int(round(min(arr.shape[:2]) * 0.012)) | 1)
    return cv2.blur(arr, (k, k))


def distance_map(arr: np.ndarray, background: Background, smooth: np.ndarray | None = None) -> np.ndarray:
    """Each pixel's distance from the background (largest channel difference, 8-bit, median-filtered);
    ``smooth``: ``smoothed(arr)`` when the caller has it already."""
    h, w = arr.shape[:2]
    if min(h, w) < 8:  # too small to filter: exact float distances
        diff = np.abs(arr.astype(np.float32).reshape(h, w, -1) - background.colour.astype(np.float32))
        return diff.max(axis=2)
    if background.coefficients is None:
        distance = _flat_distance(arr, background.colour)
    else:
        smooth = smoothed(arr) if smooth is None else smooth
        surface = background.surface((h, w), as_uint8=True).reshape(smooth.shape)
        if background.tones is None:
            distance = _channel_max_cv(cv2.absdiff(smooth, surface))
        else:  # the distance to the nearest tone of the background (16-bit signed residuals, OpenCV)
            residual = cv2.subtract(smooth, surface, dtype=cv2.CV_16S)
            distance = None
            for tone in np.rint(background.tones).astype(np.int16):
                scalar = float(tone[0]) if residual.ndim == 2 else tuple(float(v) for v in tone) + (0.0,) * (4 - len(tone))
                d = _channel_max_cv(cv2.absdiff(residual, scalar))
                distance = d if distance is None else cv2.min(distance, d)
            distance = cv2.convertScaleAbs(distance)  # saturated to 8 bits: the same as clipping to 0..255
    return cv2.medianBlur(distance, 3)


def _channel_max_cv(distance: np.ndarray) -> np.ndarray:
    """``_channel_max_image`` for OpenCV arrays of any depth (the maximum of the split channels)."""
    if distance.ndim == 3 and distance.shape[2] > 1:
        c = cv2.split(distance)
        return cv2.max(cv2.max(c[0], c[1]), c[2]) if len(c) == 3 else np.max(distance, axis=2)
    return distance.reshape(distance.shape[:2])


def _channel_max_image(distance: np.ndarray) -> np.ndarray:
    """An (h, w) or (h, w, C) distance image -> (h, w), the largest over channels."""
    if distance.ndim == 3 and distance.shape[2] > 1:
        c = [distance[..., i] for i in range(distance.shape[2])]
        return np.maximum(np.maximum(c[0], c[1]), c[2]) if len(c) == 3 else np.max(distance, axis=2)
    return distance.reshape(distance.shape[:2])


def _flat_distance(arr: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``floor(|arr - colour|)``, the largest over channels, for a colour of whole or half levels: for
    ``b = k + 0.5`` it is ``min(|v - k|, |v - (k + 1)|)``, two saturating integer differences."""
    low, high = np.floor(colour), np.ceil(colour)
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


def choose(mask: np.ndarray, part_share: float, near: float) -> tuple[np.ndarray, float]:
    """The object's pixels among the regions of ``mask``: the largest region and those at least ``part_share``
    of its size whose box lies within ``near`` (share of the largest's size) of it; and the share of the
    regions' area left out.  Regions are outer contours (OpenCV's ``findContours``: far cheaper than labelling
    every pixel); a region's holes stay holes."""
    contours, _ = cv2.findContours(mask.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) <= 1:
        return mask, 0.0
    areas = np.asarray([cv2.contourArea(c) + len(c) / 2.0 for c in contours])  # polygon area + its boundary
    best = int(np.argmax(areas))
    x, y, bw, bh = cv2.boundingRect(contours[best])
    margin_x, margin_y = near * bw, near * bh
    keep = [best]
    for i, contour in enumerate(contours):
        if i == best or areas[i] < part_share * areas[best]:
            continue
        cx, cy, cw, ch = cv2.boundingRect(contour)
        if cx < x + bw + margin_x and cx + cw > x - margin_x and cy < y + bh + margin_y and cy + ch > y - margin_y:
            keep.append(i)
    chosen = np.zeros(mask.shape, dtype=np.uint8)
    cv2.drawContours(chosen, [contours[i] for i in keep], -1, 1, thickness=cv2.FILLED)
    total = float(areas.sum())
    return mask & chosen.view(bool), 1.0 - float(areas[keep].sum()) / total if total else 0.0


def solidity(mask: np.ndarray) -> float:
    """The mask's pixels over the area of their convex hull (1.0: a convex blob; a few strokes: far less)."""
    # The hull of a set of pixels is the hull of its outer boundaries: their points alone, a fraction of the pixels.
    contours, _ = cv2.findContours(mask.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    hull = cv2.convexHull(np.concatenate(contours))
    return float(min(1.0, mask.sum() / (cv2.contourArea(hull) + len(hull) / 2.0 + 1.0)))  # + its boundary


def _regions(arr: np.ndarray, background: Background, tolerance: float, noise_factor: float, spread_factor: float,
             part_share: float, near: float, smooth: np.ndarray | None = None) -> Found:
    threshold = max(tolerance * 255.0, noise_factor * background.noise, spread_factor * background.spread)
    distance = distance_map(arr, background, smooth)
    mask = distance > (int(np.floor(threshold)) if distance.dtype == np.uint8 else threshold)
    h, w = mask.shape
    dropped = 0.0
    if min(h, w) >= SMALL:
        k = max(3, int(round(min(h, w) / 100)) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        opened = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_OPEN, kernel)
        closed = cv2.morphologyEx(opened, cv2.MORPH_CLOSE, kernel)
        mask, dropped = choose(closed.view(bool), part_share, near)
        if not mask.any():
            mask = distance > threshold  # nothing survived the opening: a thin drawing; keep what differed
    x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    box = (x, y, x + bw, y + bh) if bw and bh else None
    return Found(mask, box, background, threshold, distance, dropped)


def find(arr: np.ndarray, tolerance: float, noise_factor: float, spread_factor: float, border: float,
         part_share: float = 0.2, near: float = 0.15) -> Found:
    """The object in ``arr`` (the analysis copy): see the module docstring."""
    background = background_model(arr, border)
    smooth = smoothed(arr) if background.coefficients is not None and min(arr.shape[:2]) >= 8 else None
    found = _regions(arr, background, tolerance, noise_factor, spread_factor, part_share, near, smooth)
    if background.coefficients is not None and found.box is not None:
        # A second pass: the background surface fitted on everything but the object (dilated by 3 % of the
        # image), then the regions found again against it.
        k = max(3, int(round(min(arr.shape[:2]) * 0.03)) | 1)
        exclude = cv2.dilate(found.mask.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).view(bool)
        found = _regions(arr, refit(arr, background, exclude), tolerance, noise_factor, spread_factor, part_share, near,
                         smooth)
    return found
