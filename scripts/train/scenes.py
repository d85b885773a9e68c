"""Phone photos of Fashion-MNIST garments: the pictures people actually take, rendered by our own code.

``render_scene(garment, kind, rng, regime=...)`` puts one 28x28 white-on-black garment into a
scene and returns the JPEG bytes a phone would upload (EXIF orientation included where the
kind asks for it).  Kinds (:data:`KINDS`):

- ``flat_lay``: the garment laid on a wooden floor, a fabric or a bed sheet, 2000-4000 px,
  uneven light, slight rotation and perspective, a third of them stored sideways with an
  EXIF orientation tag (as a phone held in portrait does);
- ``clutter``: a catalogue photo with a price tag, a watermark text or a small second object
  near an edge;
- ``hanger``: the same with a hanger hook above the garment;
- ``coloured``: coloured garments (navy, red, olive, mustard, pastel, light grey, white,
  black) on white or light grey; ``light_on_light``: the light ones only;
- ``shadow``: a soft drop shadow and vignetting;
- ``edge``: the garment touching or cut by the frame edge;
- ``plain``: a plain phone photo on a light backdrop (the uploads benchmark's easy case).

The garment is opaque where it has any ink (``alpha = clip(k * g)``): a real garment does not
let the floor show through. Its own appearance keeps Fashion-MNIST's shading: the fabric runs
from a lighter tint of its colour (faint parts of ``g``) to its colour (bright parts).

``regime`` is ``"train"`` or ``"eval"``: the two draw from different parameter ranges (wood
and fabric palettes, weave periods, fonts, tag shapes, clutter objects, lighting strength), so
that the evaluation measures scenes the model was not trained on, not only other seeds.
Deterministic given the generator; no module-level state.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

GARMENT_SIZE = 28
KINDS: tuple[str, ...] = ("flat_lay", "clutter", "hanger", "coloured", "light_on_light", "shadow", "edge", "plain")
REGIMES = ("train", "eval")
SURFACES = ("wood", "fabric", "sheet")

# Phone camera sizes (landscape; portrait shots are stored landscape with an EXIF orientation tag).
PHONE_SIZES = ((4032, 3024), (4000, 3000), (3264, 2448), (2592, 1944), (2048, 1536))
# EXIF orientation -> the transpose that stores an upright picture so that the tag brings it back.
_STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}

# Named garment colours (RGB): the list.
GARMENT_COLOURS: dict[str, tuple[int, int, int]] = {
    "navy": (28, 38, 82), "red": (178, 30, 38), "olive": (98, 102, 40), "mustard": (214, 164, 42),
    "pastel pink": (240, 186, 196), "pastel blue": (176, 204, 236), "pastel green": (184, 222, 190),
    "light grey": (196, 196, 194), "white": (242, 242, 238), "black": (22, 22, 24),
}
LIGHT_COLOURS = ("pastel pink", "pastel blue", "pastel green", "light grey", "white")


@dataclass(frozen=True)
class Regime:
    """Parameter ranges of one regime (train or eval)."""

    wood: tuple[tuple[int, int, int], ...]  # plank base colours
    plank_count: tuple[int, int]  # planks across the frame
    weave_period: tuple[float, float]  # fabric thread period, in pixels of a 1000 px frame
    fabric: tuple[tuple[int, int, int], ...]
    sheet: tuple[tuple[int, int, int], ...]
    fonts: tuple[str, ...]  # matplotlib's bundled fonts, for tags and watermarks
    light: tuple[float, float]  # strength of the light gradient
    tilt: float  # rotation, degrees
    perspective: float  # corner displacement, share of the frame


_REGIMES = {
    "train": Regime(
        wood=((196, 150, 100), (150, 100, 60), (110, 72, 44), (214, 182, 140), (170, 126, 84)),
        plank_count=(3, 7), weave_period=(3.0, 7.0),
        fabric=((120, 120, 126), (70, 90, 130), (150, 130, 110), (90, 110, 80), (160, 60, 60), (60, 60, 64)),
        sheet=((236, 234, 228), (222, 230, 240), (240, 232, 220), (228, 228, 232)),
        fonts=("STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmss10.ttf", "cmr10.ttf"),
        light=(0.05, 0.3), tilt=10.0, perspective=0.04,
    ),
    "eval": Regime(
        wood=((186, 140, 96), (128, 86, 52), (204, 170, 124), (96, 64, 40), (160, 112, 70)),
        plank_count=(4, 9), weave_period=(2.5, 8.0),
        fabric=((100, 104, 112), (52, 76, 118), (164, 142, 116), (104, 120, 88), (140, 48, 56), (180, 170, 150)),
        sheet=((232, 230, 224), (216, 226, 236), (244, 236, 226), (224, 226, 230)),
        fonts=("DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf"),
        light=(0.05, 0.35), tilt=12.0, perspective=0.05,
    ),
}


def regime(name: str) -> Regime:
    if name not in _REGIMES:
        raise ValueError(f"unknown regime {name!r}; regimes are {', '.join(REGIMES)}")
    return _REGIMES[name]


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


# --------------------------------------------------------------------------------------------------
# Fields and surfaces (float32 arrays, 0..255, at the working resolution)


def smooth_noise(height: int, width: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-ish noise smooth over about ``cell`` pixels (random grid, bicubic upsampled)."""
    gh, gw = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _wood(h: int, w: int, rng: np.random.Generator, r: Regime) -> np.ndarray:
    """Planks with grain: each plank its own tone, sinuous grain lines, dark seams between planks."""
    vertical = rng.random() < 0.5
    H, W = (h, w) if vertical else (w, h)  # planks run along axis 0 of an (H, W) field, then transposed
    planks = int(rng.integers(*r.plank_count))
    edges = np.sort(rng.uniform(0, W, planks - 1)) if planks > 1 else np.array([])
    edges = np.concatenate([[0.0], np.linspace(0, W, planks + 1)[1:-1] * 0.7 + edges * 0.3, [float(W)]])
    base = np.asarray(r.wood[int(rng.integers(len(r.wood)))], dtype=np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((H, W, 3), dtype=np.float32)
    warp = smooth_noise(H, W, max(8.0, H / 6), rng) * (W / planks) * 0.25
    for left, right in zip(edges[:-1], edges[1:]):
        lo, hi = int(left), max(int(left) + 1, int(right))
        tone = base * rng.uniform(0.85, 1.12) * (1 + rng.uniform(-0.04, 0.04, 3))
        period = rng.uniform(0.01, 0.03) * W
        grain = np.sin(2 * np.pi * (xx[:, lo:hi] + warp[:, lo:hi] + rng.uniform(0, 100)) / period)
        fine = smooth_noise(H, hi - lo, 2.0, rng) * 0.5
        shade = 1.0 + 0.07 * grain + 0.03 * fine
        out[:, lo:hi] = tone[None, None, :] * shade[..., None]
        out[:, lo : min(lo + max(1, int(W * 0.003)), hi)] *= 0.55  # the seam
    return out if vertical else out.transpose(1, 0, 2)


def _weave(h: int, w: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """A plain weave: crossing threads of period ``period`` px, slightly irregular, zero-mean."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    jitter = smooth_noise(h, w, period * 6, rng) * period * 0.3
    warp_threads = np.sin(2 * np.pi * (xx + jitter) / period)
    weft_threads = np.sin(2 * np.pi * (yy - jitter) / period)
    return 0.5 * (warp_threads * weft_threads) + 0.25 * (warp_threads + weft_threads)


def _fabric(h: int, w: int, rng: np.random.Generator, r: Regime, scale: float) -> np.ndarray:
    """A woven fabric (tablecloth, rug, towel): threads, a large check or stripe pattern sometimes, wrinkles."""
    base = np.asarray(r.fabric[int(rng.integers(len(r.fabric)))], dtype=np.float32)
    period = max(2.0, rng.uniform(*r.weave_period) * scale)
    shade = 1.0 + 0.12 * _weave(h, w, period, rng)
    pattern = rng.random()
    if pattern < 0.35:  # checks or stripes of a second tone
        cell = rng.uniform(0.05, 0.15) * min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        bands = (np.floor(xx / cell) % 2) if rng.random() < 0.5 else (np.floor(xx / cell) + np.floor(yy / cell)) % 2
        shade = shade * (1.0 - rng.uniform(0.1, 0.3) * bands)
    wrinkles = smooth_noise(h, w, min(h, w) / rng.uniform(3, 8), rng)
    shade = shade * (1.0 + 0.08 * wrinkles)
    return base[None, None, :] * shade[..., None]


def _sheet(h: int, w: int, rng: np.random.Generator, r: Regime, scale: float) -> np.ndarray:
    """A light bed sheet: soft folds (long, anisotropic shading), a faint weave, sometimes a pinstripe."""
    base = np.asarray(r.sheet[int(rng.integers(len(r.sheet)))], dtype=np.float32)
    # Folds: noise stretched along one direction, so the shading runs in long soft ridges.
    if rng.random() < 0.5:
        folds = smooth_noise(h, max(2, w // 6), min(h, w) / 24, rng)
    else:
        folds = smooth_noise(max(2, h // 6), w, min(h, w) / 24, rng)
    folds = np.asarray(Image.fromarray(folds).resize((w, h), Image.BICUBIC), dtype=np.float32)
    shade = 1.0 + 0.07 * folds + 0.03 * _weave(h, w, max(2.0, 3.0 * scale), rng)
    if rng.random() < 0.3:
        xx = np.arange(w, dtype=np.float32)[None, :]
        shade = shade * (1.0 - 0.06 * (np.sin(2 * np.pi * xx / (rng.uniform(0.02, 0.05) * w)) > 0.9))
    return base[None, None, :] * shade[..., None]


def surface(name: str, h: int, w: int, rng: np.random.Generator, r: Regime) -> np.ndarray:
    scale = max(h, w) / 1000.0
    if name == "wood":
        return _wood(h, w, rng, r)
    if name == "fabric":
        return _fabric(h, w, rng, r, scale)
    if name == "sheet":
        return _sheet(h, w, rng, r, scale)
    raise ValueError(f"unknown surface {name!r}; surfaces are {', '.join(SURFACES)}")


def backdrop(h: int, w: int, rng: np.random.Generator, light_grey: bool | None = None) -> np.ndarray:
    """A white or light grey seamless paper backdrop with a faint gradient."""
    grey = rng.random() < 0.5 if light_grey is None else light_grey
    level = rng.uniform(200, 225) if grey else rng.uniform(240, 253)
    tint = 1 + rng.uniform(-0.015, 0.015, 3)
    return np.full((h, w, 3), level, dtype=np.float32) * tint[None, None, :] * lighting(h, w, rng, 0.05)[..., None]


def lighting(h: int, w: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Uneven light: a linear ramp in a random direction and a soft hotspot, multiplicative, mean about 1."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xx / max(w - 1, 1) - 0.5) * np.cos(angle) + (yy / max(h - 1, 1) - 0.5) * np.sin(angle)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    spot = np.exp(-(((yy - cy) / (0.6 * h)) ** 2 + ((xx - cx) / (0.6 * w)) ** 2))
    return (1.0 + 2.0 * strength * ramp) * (1.0 - 0.5 * strength + strength * spot)


def vignette(h: int, w: int, strength: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    return 1.0 - strength * r2 / 2.0


# --------------------------------------------------------------------------------------------------
# The garment layer


@dataclass
class Layer:
    """A garment (or object) as an RGB appearance and an alpha map, both (h, w) at the working resolution."""

    rgb: np.ndarray  # (h, w, 3) float 0..255
    alpha: np.ndarray  # (h, w) float 0..1


def garment_layer(garment: np.ndarray, side: int, colour: np.ndarray, rng: np.random.Generator,
                  angle: float = 0.0) -> Layer:
    """The garment upscaled to ``side`` px, opaque where it has ink, shaded by Fashion-MNIST's intensities,
    with a faint fabric texture; rotated by ``angle`` degrees (the layer grows to hold it)."""
    from scipy import ndimage

    resample = Image.BICUBIC if rng.random() < 0.5 else Image.LANCZOS

    def upscaled(a28: np.ndarray) -> np.ndarray:
        tile = Image.fromarray(np.clip(a28 * 255.0, 0, 255).astype(np.uint8)).resize((side, side), resample)
        return np.asarray(tile, dtype=np.float32) / 255.0

    g28 = garment.astype(np.float32) / 255.0
    g = upscaled(g28)
    # Opaque: every pixel with ink, and holes inside the garment filled (a print is fabric too, not a hole);
    # the filled silhouette is smoothed so it has no staircase from the 28x28 grid.
    body = ndimage.binary_fill_holes(g28 > rng.uniform(0.06, 0.14)).astype(np.uint8) * 255
    body = Image.fromarray(body).resize((side, side), Image.BICUBIC).filter(ImageFilter.GaussianBlur(side / 56))
    body = np.clip((np.asarray(body, dtype=np.float32) / 255.0 - 0.3) / 0.4, 0.0, 1.0)
    alpha = np.maximum(np.clip((g - 0.08) / 0.22, 0.0, 1.0), body)
    # Shading from the intensities, saturated early so the fall-off at the edge is not painted as a pale rim.
    g = np.clip(g / 0.7, 0.0, 1.0)
    # Fashion-MNIST's intensity is a product photo's darkness: its faint parts are the fabric's lightest tint, its
    # bright parts the fabric in shade. A light fabric's shaded parts are darker than its colour (a white shirt's
    # folds and seams are grey), a dark fabric's about its colour.
    lum = float(colour @ np.asarray([0.299, 0.587, 0.114]))
    pale = colour + (255.0 - colour) * rng.uniform(0.35, 0.6)  # the lightest tint of the fabric
    deep = colour * (1.0 - rng.uniform(0.3, 0.45) * lum / 255.0)  # the fabric in shade
    rgb = pale[None, None, :] * (1.0 - g[..., None]) + deep[None, None, :] * g[..., None]
    rgb = rgb * (1.0 + 0.03 * smooth_noise(side, side, max(1.5, side / 150), rng))[..., None]
    if angle:
        rgba = np.dstack([np.clip(rgb, 0, 255), alpha * 255.0]).astype(np.uint8)
        turned = np.asarray(Image.fromarray(rgba).rotate(angle, Image.BICUBIC, expand=True), dtype=np.float32)
        rgb, alpha = turned[..., :3], turned[..., 3] / 255.0
    return Layer(rgb, alpha)


def paste(canvas: np.ndarray, layer: Layer, left: int, top: int) -> np.ndarray:
    """Alpha-blend ``layer`` onto ``canvas`` at (left, top); parts outside the canvas are cut off."""
    h, w = canvas.shape[:2]
    lh, lw = layer.alpha.shape
    x0, y0, x1, y1 = max(0, left), max(0, top), min(w, left + lw), min(h, top + lh)
    if x0 >= x1 or y0 >= y1:
        return canvas
    a = layer.alpha[y0 - top : y1 - top, x0 - left : x1 - left, None]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1.0 - a) + layer.rgb[y0 - top : y1 - top, x0 - left : x1 - left] * a
    return canvas


def shadow(canvas: np.ndarray, layer: Layer, left: int, top: int, offset: tuple[int, int], blur: float,
           depth: float) -> np.ndarray:
    """Darken ``canvas`` under a blurred, offset copy of the layer's silhouette."""
    h, w = canvas.shape[:2]
    mask = np.zeros((h, w, 1), dtype=np.float32)
    mask = paste(mask, Layer(np.ones((*layer.alpha.shape, 1), dtype=np.float32), layer.alpha),
                 left + offset[0], top + offset[1])[..., 0]
    mask = Image.fromarray(np.clip(mask * 255.0, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    return canvas * (1.0 - depth * np.asarray(mask, dtype=np.float32) / 255.0)[..., None]


# --------------------------------------------------------------------------------------------------
# Clutter


def price_tag(canvas: np.ndarray, rng: np.random.Generator, r: Regime, box: tuple[int, int, int, int]) -> np.ndarray:
    """A small white or yellow tag with a price, near an edge, tied to the garment by a thin string."""
    h, w = canvas.shape[:2]
    unit = min(h, w)
    tw, th = int(unit * rng.uniform(0.08, 0.14)), int(unit * rng.uniform(0.05, 0.08))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = box
    corner = int(rng.integers(4))
    x = int(rng.uniform(0.01, 0.06) * w) if corner in (0, 2) else int(w - tw - rng.uniform(0.01, 0.06) * w)
    y = int(rng.uniform(0.01, 0.06) * h) if corner in (0, 1) else int(h - th - rng.uniform(0.01, 0.06) * h)
    anchor = (min(max(x + tw // 2, left), right), min(max(y + th // 2, top), bottom))
    draw.line([(x + tw // 2, y + th // 2), anchor], fill=(60, 60, 60), width=max(1, unit // 400))
    colour = (250, 250, 246) if rng.random() < 0.6 else (250, 226, 90)
    draw.rectangle([x, y, x + tw, y + th], fill=colour, outline=(150, 150, 150), width=max(1, unit // 500))
    font = _font(r.fonts[int(rng.integers(len(r.fonts)))], max(8, int(th * 0.5)))
    price = f"${rng.integers(5, 200)}.{rng.integers(0, 100):02d}"
    draw.text((x + tw * 0.12, y + th * 0.2), price, fill=(20, 20, 20), font=font)
    return np.asarray(img, dtype=np.float32)


def watermark(canvas: np.ndarray, rng: np.random.Generator, r: Regime) -> np.ndarray:
    """A semi-transparent shop name or SAMPLE text along an edge."""
    h, w = canvas.shape[:2]
    words = ("SAMPLE", "© shop", "PREVIEW", "outlet.example", "photo: studio", "NEW IN")
    text = words[int(rng.integers(len(words)))]
    font = _font(r.fonts[int(rng.integers(len(r.fonts)))], max(10, int(min(h, w) * rng.uniform(0.04, 0.08))))
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
    x = int(rng.uniform(0.02, 0.98) * max(1, w - (tr - tl)))
    y = int(rng.uniform(0.01, 0.04) * h) if rng.random() < 0.5 else int(h - (tb - tt) - rng.uniform(0.02, 0.06) * h)
    draw.text((x - tl, y - tt), text, fill=255, font=font)
    a = np.asarray(layer, dtype=np.float32)[..., None] / 255.0 * rng.uniform(0.35, 0.7)
    ink = 40.0 if rng.random() < 0.6 else 255.0
    return canvas * (1 - a) + ink * a


def small_object(canvas: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int]) -> np.ndarray:
    """A small second object near an edge: a coin, a button, a folded card or a key-like bar."""
    h, w = canvas.shape[:2]
    unit = min(h, w)
    size = int(unit * rng.uniform(0.05, 0.1))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = box
    for _ in range(20):  # near an edge and clear of the garment
        x = int(rng.uniform(0.02, 0.98) * (w - size))
        y = int(rng.uniform(0.02, 0.98) * (h - size))
        near_edge = min(x, y, w - x - size, h - y - size) < 0.12 * unit
        clear = x + size < left or x > right or y + size < top or y > bottom
        if near_edge and clear:
            break
    colour = tuple(int(c) for c in rng.integers(20, 200, 3))
    shape = int(rng.integers(3))
    if shape == 0:
        draw.ellipse([x, y, x + size, y + size], fill=colour, outline=(30, 30, 30))
    elif shape == 1:
        draw.rectangle([x, y, x + size, y + int(size * 0.6)], fill=colour)
    else:
        draw.rounded_rectangle([x, y, x + size, y + size // 4], radius=size // 10, fill=colour)
    return np.asarray(img, dtype=np.float32)


def hanger(canvas: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int]) -> np.ndarray:
    """A hanger hook above the garment: a curved hook and a bar resting on its shoulders."""
    left, top, right, bottom = box
    width = right - left
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx = (left + right) // 2 + int(rng.uniform(-0.05, 0.05) * width)
    stroke = max(2, int(width * rng.uniform(0.012, 0.025)))
    colour = (70, 70, 74) if rng.random() < 0.6 else (150, 110, 70)  # metal or wood
    hook_h = int(width * rng.uniform(0.18, 0.3))
    r = max(3, hook_h // 3)
    stem_top = max(r * 2 + 2, top - hook_h)
    draw.line([(cx, top + stroke), (cx, stem_top)], fill=colour, width=stroke)
    draw.arc([cx - r, stem_top - 2 * r, cx + r, stem_top], start=0, end=200, fill=colour, width=stroke)
    if rng.random() < 0.7:
        draw.line([(left + width * 0.15, top + stroke * 2), (cx, top - stroke)], fill=colour, width=stroke)
        draw.line([(right - width * 0.15, top + stroke * 2), (cx, top - stroke)], fill=colour, width=stroke)
    return np.asarray(img, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Scenes


def perspective(img: Image.Image, rng: np.random.Generator, amount: float) -> Image.Image:
    """A slight perspective: the frame shows a quadrilateral of the scene whose corners lie up to ``amount``
    of the frame inside its corners (so nothing outside the scene is ever shown)."""
    w, h = img.size
    frame = [(0, 0), (w, 0), (w, h), (0, h)]
    inward = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    quad = [(x + sx * rng.uniform(0, amount) * w, y + sy * rng.uniform(0, amount) * h)
            for (x, y), (sx, sy) in zip(frame, inward)]
    # The coefficients map each output pixel (frame) to where it is sampled in the input (quad).
    rows, rhs = [], []
    for (x, y), (u, v) in zip(frame, quad):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    coeffs = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return img.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC)


@dataclass(frozen=True)
class Scene:
    """What was rendered: the JPEG bytes, the EXIF orientation they carry and where the garment is (upright pixels)."""

    data: bytes
    orientation: int  # 1: none
    size: tuple[int, int]  # upright (width, height)
    garment_box: tuple[int, int, int, int]  # (left, top, right, bottom) in the upright picture
    kind: str
    detail: str  # the surface, the clutter or the colour drawn


def render_scene(garment: np.ndarray, kind: str, rng: np.random.Generator, regime_name: str = "eval",
                 size: tuple[int, int] | None = None, orientation: int | None = None,
                 work: int = 1400, quality: tuple[int, int] = (80, 93), grain: int = 4) -> Scene:
    """One garment in one scene; see the module docstring for the kinds.

    ``size``: the upright (width, height) of the photo (default: a phone size for ``flat_lay``,
    ``plain`` and ``edge``, 600-1600 px catalogue sizes for the others), portrait or landscape.
    ``orientation``: the EXIF orientation to store it with (default: a third of ``flat_lay``
    photos get 6 or 8). ``work``: the long side the scene is drawn at before it is scaled to
    ``size`` (sensor grain of +-``grain`` levels is then added at full size; phones that denoise leave
    less: ``grain=1`` and ``quality=(80, 80)`` give a 4000x3000 photo of about 1 MB).
    """
    garment = np.asarray(garment)
    if garment.shape != (GARMENT_SIZE, GARMENT_SIZE) or garment.dtype != np.uint8:
        raise ValueError(f"garment must be a (28, 28) uint8 array, got {garment.shape} {garment.dtype}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    r = regime(regime_name)
    if size is None:
        if kind in ("flat_lay", "plain", "edge"):
            size = PHONE_SIZES[int(rng.integers(len(PHONE_SIZES)))]
        else:
            long_ = int(rng.integers(600, 1601))
            size = (long_, int(long_ * rng.uniform(0.7, 0.85)))
        if rng.random() < 0.4:
            size = (size[1], size[0])
    if orientation is None:
        orientation = int(rng.choice([6, 8])) if kind == "flat_lay" and rng.random() < 1 / 3 else 1
    W, H = size
    f = min(1.0, work / max(W, H))
    w, h = max(32, round(W * f)), max(32, round(H * f))
    detail = ""

    light_garment = kind == "light_on_light"
    if kind in ("coloured", "light_on_light"):
        names = LIGHT_COLOURS if light_garment else tuple(GARMENT_COLOURS)
        detail = names[int(rng.integers(len(names)))]
        colour = np.asarray(GARMENT_COLOURS[detail], dtype=np.float32)
    elif kind == "flat_lay" and rng.random() < 0.5:
        detail = tuple(GARMENT_COLOURS)[int(rng.integers(len(GARMENT_COLOURS)))]
        colour = np.asarray(GARMENT_COLOURS[detail], dtype=np.float32)
    else:
        colour = np.clip(rng.uniform(10, 70) + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)

    if kind == "flat_lay":
        name = SURFACES[int(rng.integers(len(SURFACES)))]
        detail = f"{name}, {detail or 'dark'} garment"
        canvas = surface(name, h, w, rng, r)
    elif kind in ("coloured", "light_on_light"):
        canvas = backdrop(h, w, rng, light_grey=bool(rng.random() < 0.5))
    else:
        canvas = backdrop(h, w, rng)

    share = {"flat_lay": (0.45, 0.8), "edge": (0.7, 1.05), "plain": (0.4, 0.75)}.get(kind, (0.5, 0.8))
    side = max(8, round(min(w, h) * rng.uniform(*share)))
    angle = rng.uniform(-r.tilt, r.tilt) if kind in ("flat_lay", "edge") else rng.uniform(-3, 3)
    layer = garment_layer(garment, side, colour, rng, angle)
    lh, lw = layer.alpha.shape
    if kind == "edge":  # touching or crossing one or two frame edges by up to 15 % of the garment
        over = rng.uniform(0.0, 0.15, 2) * (lw, lh)
        left = int(-over[0]) if rng.random() < 0.5 else int(w - lw + over[0])
        top = int(rng.uniform(0, max(1, h - lh))) if rng.random() < 0.5 else (int(-over[1]) if rng.random() < 0.5 else int(h - lh + over[1]))
        detail = "cut by the frame" if over.max() > 1 else "touching the frame"
    else:
        top_room = int(0.22 * h) if kind == "hanger" else 0
        left = int(rng.uniform(0.05, 0.95) * max(1, w - lw))
        top = top_room + int(rng.uniform(0.05, 0.95) * max(1, h - lh - top_room))
    if kind in ("shadow", "flat_lay") or (kind in ("coloured", "light_on_light") and rng.random() < 0.5):
        depth = rng.uniform(0.25, 0.5) if kind == "shadow" else rng.uniform(0.1, 0.3)
        offset = tuple(int(v) for v in rng.uniform(0.01, 0.05, 2) * side)
        canvas = shadow(canvas, layer, left, top, offset, side * rng.uniform(0.02, 0.06), depth)
    canvas = paste(canvas, layer, left, top)
    ys, xs = np.nonzero(layer.alpha > 0.5)
    box = (max(0, left + int(xs.min())), max(0, top + int(ys.min())), min(w, left + int(xs.max()) + 1),
           min(h, top + int(ys.max()) + 1)) if len(xs) else (0, 0, w, h)

    if kind == "clutter":
        what = int(rng.integers(3))
        detail = ("price tag", "watermark", "second object")[what]
        canvas = (price_tag(canvas, rng, r, box), watermark(canvas, rng, r), small_object(canvas, rng, box))[what]
    elif kind == "hanger":
        canvas = hanger(canvas, rng, box)
        detail = "hanger"
    strength = rng.uniform(*r.light) if kind == "flat_lay" else rng.uniform(0.0, 0.08)
    canvas = canvas * lighting(h, w, rng, strength)[..., None]
    if kind == "shadow":
        canvas = canvas * vignette(h, w, rng.uniform(0.15, 0.4))[..., None]
        detail = "shadow and vignette"
    canvas = canvas * (1 + rng.uniform(-0.03, 0.03, 3))[None, None, :]  # white balance

    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    if kind == "flat_lay":
        img = perspective(img, rng, r.perspective)
    if (w, h) != (W, H):
        img = img.resize((W, H), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.integers(-grain, grain + 1, size=(H, W, 1), dtype=np.int16)  # sensor grain, at full size
    img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    scale = W / w
    garment_box = tuple(int(round(v * scale)) for v in box)
    stored = img.transpose(_STORE[orientation]) if orientation in _STORE else img
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)), exif=exif.tobytes())
    return Scene(buffer.getvalue(), orientation, (W, H), garment_box, kind, detail)


def render_scenes(garments, kind: str, seed: int, regime_name: str = "eval", **kwargs) -> list[Scene]:
    """``render_scene`` on every garment with one generator per (kind, regime, seed): reproducible sets."""
    rng = np.random.default_rng([seed, KINDS.index(kind), REGIMES.index(regime_name)])
    return [render_scene(g, kind, rng, regime_name, **kwargs) for g in garments]


# Training's mix: catalogue photos (scripts.train.photos) and scenes of every kind, each scene 400-1000 px on its
# long side (a phone photo decodes at 1/8 to 500x375 anyway: handler/decode.py), in the train regime.
CATALOGUE_SHARE = 0.4


def training_photo(garment: np.ndarray, rng: np.random.Generator, regime_name: str = "train") -> bytes:
    """One photo of ``garment`` as training sees them: a catalogue photo (40 %) or a scene of a random kind,
    the JPEG file's bytes (sent through the server's own decoding by ``scripts.train.data.eval_inputs``)."""
    from scripts.train.photos import STYLES, render_photo_bytes

    if rng.random() < CATALOGUE_SHARE:
        return render_photo_bytes(garment, STYLES[int(rng.integers(len(STYLES)))], rng)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    long_ = int(rng.integers(400, 1001))
    size = (long_, int(long_ * rng.uniform(0.7, 0.8)))
    if rng.random() < 0.4:
        size = size[::-1]
    return render_scene(garment, kind, rng, regime_name, size=size, work=long_).data
