"""Catalogue-style photos of Fashion-MNIST garments, rendered by our own code.

``render_photo(garment, style, rng)`` turns one 28x28 white-on-black garment into the
kind of picture a shop uploads: a dark garment on a white or tinted backdrop, a small
garment in a large dark frame, a studio shot with a drop shadow; JPEG-compressed like a
real upload.  Training renders training garments and canonicalises them back through
the handler's preprocessing (augmentation matched to what canonicalisation leaves);
``scripts.evaluate.real_world`` renders held-out garments to measure the service on
photos.  Deterministic given the generator passed in; no module-level state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

STYLES: tuple[str, ...] = ("catalogue_white", "catalogue_tinted", "dark_small", "studio_shadow", "dark_studio")
"""Catalogue-photo styles understood by :func:`render_photo`.

- ``catalogue_white``: dark (inverted), slightly tinted garment upscaled 4-10x on a
  white background, off-centre with wide margins, JPEG quality 70-95.
- ``catalogue_tinted``: as above on a light beige/grey/blue/pink/mint backdrop with
  a gentle gradient, vignetting and mild sensor noise.
- ``dark_small``: light garment on black, upscaled only 1-3x, off-centre in a much
  larger frame, JPEG.
- ``studio_shadow``: dark garment on white with a soft drop shadow and a slight
  lens blur, JPEG.
- ``dark_studio``: light garment (the training polarity) upscaled 4-8x on a dark
  charcoal backdrop with a gradient and noise, JPEG: the closest style to the
  training data, a control for the effect of the frame alone.
"""

GARMENT_SIZE = 28

# Light backdrops for ``catalogue_tinted`` (RGB): beige, light grey, pale blue, pale pink, mint, cream.
_TINTED_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (236, 226, 208), (226, 226, 224), (218, 228, 240), (240, 224, 226), (222, 238, 228), (246, 240, 222),
)



# --------------------------------------------------------------------------------------------------
# Small helpers


def _jpeg(img: Image.Image, rng: np.random.Generator, quality: tuple[int, int] = (70, 95)) -> bytes:
    """Encode ``img`` as JPEG with a random quality in ``quality`` (inclusive): the bytes a shop uploads."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    return buffer.getvalue()


def to_image(arr: np.ndarray) -> Image.Image:
    """Float array in 0..255, (H, W) or (H, W, 3) -> 8-bit 'L' or 'RGB' image."""
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _upscale(garment: np.ndarray, side: int, resample: int) -> np.ndarray:
    """A (28, 28) uint8 tile -> (side, side) float alpha in 0..1, smoothly resampled."""
    big = Image.fromarray(garment, mode="L").resize((side, side), resample)
    return np.clip(np.asarray(big, dtype=np.float32) / 255.0, 0.0, 1.0)


def _frame(obj: int, rng: np.random.Generator, margin: tuple[float, float]) -> tuple[int, int, int, int]:
    """A frame (width, height) for a square object of side ``obj`` and where the object goes.

    Each frame side is ``obj`` times an independent factor in ``margin`` (so the aspect
    varies); the object is placed at a uniformly random position that keeps it whole.
    Returns (width, height, left, top).
    """
    width = max(obj + 2, round(obj * rng.uniform(*margin)))
    height = max(obj + 2, round(obj * rng.uniform(*margin)))
    left = int(rng.integers(0, width - obj + 1))
    top = int(rng.integers(0, height - obj + 1))
    return width, height, left, top


def _place(alpha: np.ndarray, width: int, height: int, left: int, top: int) -> np.ndarray:
    """Paste a square alpha map into an empty (height, width) map at (left, top)."""
    full = np.zeros((height, width), dtype=np.float32)
    full[top : top + alpha.shape[0], left : left + alpha.shape[1]] = alpha
    return full


def _gradient(width: int, height: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A linear brightness ramp in a random direction, multiplicative, mean 1, +-``strength``."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / max(width - 1, 1) - 0.5) * np.cos(angle) + (yy / max(height - 1, 1) - 0.5) * np.sin(angle)
    return 1.0 + 2.0 * strength * ramp


def _vignette(width: int, height: int, strength: float) -> np.ndarray:
    """Multiplicative radial darkening: 1 in the centre, ``1 - strength`` in the corners."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r2 = ((xx - (width - 1) / 2) / (width / 2)) ** 2 + ((yy - (height - 1) / 2) / (height / 2)) ** 2
    return 1.0 - strength * r2 / 2.0


def _composite(background: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend a flat-coloured garment over an (H, W, 3) background with the (H, W) alpha map."""
    a = alpha[..., None]
    return background * (1.0 - a) + colour[None, None, :] * a


def _dark_garment_colour(rng: np.random.Generator) -> np.ndarray:
    """A dark, slightly tinted fabric colour (navy, brown, olive, charcoal...)."""
    base = rng.uniform(0, 45)
    return np.clip(base + rng.uniform(-18, 18, size=3), 0, 255).astype(np.float32)


def _light_garment_colour(rng: np.random.Generator) -> np.ndarray:
    """A light, slightly tinted fabric colour."""
    base = rng.uniform(215, 255)
    return np.clip(base + rng.uniform(-20, 8, size=3), 0, 255).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Garment renders


def _render_light_background(garment: np.ndarray, rng: np.random.Generator, tinted: bool) -> bytes:
    factor = rng.uniform(4.0, 10.0)
    side = round(GARMENT_SIZE * factor)
    resample = Image.BICUBIC if rng.random() < 0.5 else Image.LANCZOS
    width, height, left, top = _frame(side, rng, (1.35, 2.4))
    alpha = _place(_upscale(garment, side, resample), width, height, left, top)
    if tinted:
        base = np.asarray(_TINTED_BACKGROUNDS[rng.integers(len(_TINTED_BACKGROUNDS))], dtype=np.float32)
        base = np.clip(base + rng.uniform(-8, 8, size=3), 0, 255)
        shade = _gradient(width, height, rng, rng.uniform(0.02, 0.07)) * _vignette(width, height, rng.uniform(0.05, 0.2))
        background = base[None, None, :] * shade[..., None]
    else:
        background = np.full((height, width, 3), rng.uniform(247, 255), dtype=np.float32)
    out = _composite(background, alpha, _dark_garment_colour(rng))
    if tinted:
        out = out + rng.normal(0.0, rng.uniform(1.5, 4.5), size=out.shape)
    return _jpeg(to_image(out), rng)


def _render_dark_small(garment: np.ndarray, rng: np.random.Generator) -> bytes:
    side = round(GARMENT_SIZE * rng.uniform(1.0, 3.0))
    resample = Image.BICUBIC if rng.random() < 0.5 else Image.LANCZOS
    width, height, left, top = _frame(side, rng, (3.0, 7.0))
    alpha = _place(_upscale(garment, side, resample), width, height, left, top)
    background = np.full((height, width, 3), rng.uniform(0, 18), dtype=np.float32)
    out = _composite(background, alpha, _light_garment_colour(rng))
    out = out + rng.normal(0.0, rng.uniform(0.5, 3.0), size=out.shape)
    return _jpeg(to_image(out), rng)


def _render_studio_shadow(garment: np.ndarray, rng: np.random.Generator) -> bytes:
    factor = rng.uniform(4.0, 9.0)
    side = round(GARMENT_SIZE * factor)
    resample = Image.BICUBIC if rng.random() < 0.5 else Image.LANCZOS
    width, height, left, top = _frame(side, rng, (1.45, 2.4))
    tile = _upscale(garment, side, resample)
    alpha = _place(tile, width, height, left, top)
    # Drop shadow: the garment's silhouette, offset down-right (light from the top left) and blurred.
    silhouette = np.clip(tile * 3.0, 0.0, 1.0)
    dx, dy = (round(side * rng.uniform(0.02, 0.06)) for _ in range(2))
    shadow_left, shadow_top = min(left + dx, width - side), min(top + dy, height - side)
    shadow = _place(silhouette, width, height, shadow_left, shadow_top)
    radius = side * rng.uniform(0.03, 0.07)
    shadow_img = Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    shadow = np.asarray(shadow_img, dtype=np.float32) / 255.0
    background = np.full((height, width, 3), rng.uniform(240, 255), dtype=np.float32)
    background *= _vignette(width, height, rng.uniform(0.0, 0.08))[..., None]
    background *= (1.0 - rng.uniform(0.25, 0.5) * shadow)[..., None]
    out = _composite(background, alpha, _dark_garment_colour(rng))
    blurred = to_image(out).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return _jpeg(blurred, rng)


def _render_dark_studio(garment: np.ndarray, rng: np.random.Generator) -> bytes:
    side = round(GARMENT_SIZE * rng.uniform(4.0, 8.0))
    resample = Image.BICUBIC if rng.random() < 0.5 else Image.LANCZOS
    width, height, left, top = _frame(side, rng, (1.35, 2.2))
    alpha = _place(_upscale(garment, side, resample), width, height, left, top)
    base = rng.uniform(18, 48) + rng.uniform(-4, 4, size=3)
    shade = _gradient(width, height, rng, rng.uniform(0.05, 0.2)) * _vignette(width, height, rng.uniform(0.1, 0.3))
    background = base[None, None, :] * shade[..., None]
    out = _composite(background, alpha, _light_garment_colour(rng))
    out = out + rng.normal(0.0, rng.uniform(1.0, 4.0), size=out.shape)
    return _jpeg(to_image(out), rng)


def render_photo_bytes(garment: np.ndarray, style: str, rng: np.random.Generator) -> bytes:
    """Render one Fashion-MNIST garment the way a shop would photograph it: the JPEG file's bytes.

    Args:
        garment: (28, 28) uint8 array, white garment on black (Fashion-MNIST polarity).
        style: one of :data:`STYLES`.
        rng: the only source of randomness; the same generator state gives the same image.

    Returns:
        A JPEG (quality 70-95) of an RGB picture larger than 28x28 and usually not square.
        The garment is upscaled with a smooth filter (bicubic or Lanczos) and always lies
        entirely inside the frame.  On light backgrounds its intensities are inverted
        (``alpha = garment / 255`` blends a dark fabric colour over the backdrop, so a white
        backdrop gives ``255 - garment``).  Training and evaluation send these bytes through
        the server's own decoding (``handler.preprocess.bytes_to_input``).
    """
    garment = np.asarray(garment)
    if garment.shape != (GARMENT_SIZE, GARMENT_SIZE) or garment.dtype != np.uint8:
        raise ValueError(f"garment must be a (28, 28) uint8 array, got {garment.shape} {garment.dtype}")
    if style == "catalogue_white":
        return _render_light_background(garment, rng, tinted=False)
    if style == "catalogue_tinted":
        return _render_light_background(garment, rng, tinted=True)
    if style == "dark_small":
        return _render_dark_small(garment, rng)
    if style == "studio_shadow":
        return _render_studio_shadow(garment, rng)
    if style == "dark_studio":
        return _render_dark_studio(garment, rng)
    raise ValueError(f"unknown style {style!r}; valid styles are {', '.join(STYLES)}")


def decoded(data: bytes) -> Image.Image:
    """A rendered JPEG as a loaded PIL image (every pixel: for pictures, contact sheets and tools that
    take images; the server's path is the bytes)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def render_photo(garment: np.ndarray, style: str, rng: np.random.Generator) -> Image.Image:
    """:func:`render_photo_bytes`, decoded: an 'RGB' PIL image."""
    return decoded(render_photo_bytes(garment, style, rng))


def style_rng(style: str, seed: int) -> np.random.Generator:
    """The generator :func:`render_all` uses for ``style``: independent per style, fixed by ``seed``."""
    return np.random.default_rng([seed, STYLES.index(style)])


def render_all(garments: Sequence[np.ndarray] | np.ndarray, style: str, seed: int = 0,
               as_bytes: bool = False) -> list[Image.Image] | list[bytes]:
    """``render_photo`` on every garment in order with one generator per (style, seed): reproducible sets
    (``as_bytes``: the JPEG files, as uploaded)."""
    rng = style_rng(style, seed)
    data = [render_photo_bytes(g, style, rng) for g in garments]
    return data if as_bytes else [decoded(d) for d in data]
