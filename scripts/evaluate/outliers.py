"""Images that are not garments, built only from data shipped inside installed packages.

``non_garment_sets(n_per_set, seed)`` returns digits, photos, faces, text, noise and
shapes (see its docstring for where each comes from); nothing is downloaded.  The
real-world evaluation measures how many of them the service flags out of
distribution; the detector never sees any of these sources while it is fitted.

    python -m scripts.evaluate.outliers --out build/contact_sheet.png   # look at them
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from scripts.train.data import DEFAULT_DATA, read_idx
from scripts.train.photos import STYLES, render_all, to_image

NON_GARMENT_SETS: tuple[str, ...] = ("digits", "photos", "faces", "text", "noise", "shapes", "mnist_digits")
"""Names of the sets returned by :func:`non_garment_sets`, in order."""

MIN_SIDE, MAX_SIDE = 28, 400  # size range of the non-garment images

_WORDS: tuple[str, ...] = (
    "sale", "new", "summer", "collection", "free shipping", "order now", "size", "price", "invoice", "total",
    "hello", "world", "receipt", "delivery", "return policy", "contact", "menu", "coffee", "open", "closed",
    "exit", "warning", "page 12", "chapter", "2024", "tel. 555 0199", "the quick brown fox", "lorem ipsum",
    "dolor sit amet", "best seller", "limited", "discount 30%", "cotton", "made in", "thank you", "welcome",
)

_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf",
)

# Face boxes (left, top, right, bottom) in the shipped portraits, found by eye.
_FACE_BOXES: dict[str, tuple[int, int, int, int]] = {
    "grace_hopper.jpg": (140, 110, 390, 370),  # matplotlib: face and shoulders of the collar, without the cap
    "astronaut.png": (145, 15, 305, 200),  # scikit-image: Eileen Collins' face and hair
}

# scikit-image ``skimage/data`` files shipped in the wheel (no pooch download) used as generic photos.
_SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "coins.png", "brick.png",
    "grass.png", "gravel.png", "moon.png", "hubble_deep_field.jpg", "motorcycle_left.png", "retina.jpg", "ihc.png",
)

# --------------------------------------------------------------------------------------------------
# Source data shipped inside installed packages


@dataclass(frozen=True)
class _Sources:
    """Images read once per :func:`non_garment_sets` call (never cached across calls)."""

    digits: np.ndarray  # (1797, 8, 8) float 0..16, scikit-learn
    photos: tuple[Image.Image, ...]  # RGB or L photographs
    faces: tuple[Image.Image, ...]  # tight face crops (RGB portraits)
    small_faces: np.ndarray  # (n, 25, 25) float 0..1 (scikit-image LFW subset), may be empty
    fonts: tuple[Path, ...]


def _matplotlib_data() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path())


def _skimage_data() -> Path | None:
    """scikit-image's ``skimage/data`` folder, or None when scikit-image is not installed."""
    try:
        import skimage.data
    except ImportError:
        return None
    return Path(skimage.data.__file__).parent


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()


def _load_sources() -> _Sources:
    """Read every source file; see :func:`non_garment_sets` for where each lives."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits().images.astype(np.float32)
    photos = [Image.fromarray(arr) for arr in load_sample_images().images]
    hopper = _open_rgb(_matplotlib_data() / "sample_data" / "grace_hopper.jpg")
    photos.append(hopper)
    faces = [hopper.crop(_FACE_BOXES["grace_hopper.jpg"])]
    small_faces = np.zeros((0, 25, 25), dtype=np.float32)
    skdata = _skimage_data()
    if skdata is not None:
        photos += [_open_rgb(skdata / name) for name in _SKIMAGE_PHOTOS if (skdata / name).is_file()]
        if (skdata / "astronaut.png").is_file():
            faces.append(_open_rgb(skdata / "astronaut.png").crop(_FACE_BOXES["astronaut.png"]))
        if (skdata / "lfw_subset.npy").is_file():
            small_faces = np.load(skdata / "lfw_subset.npy")[:100].astype(np.float32)  # rows 0-99 are faces
    font_dir = _matplotlib_data() / "fonts" / "ttf"
    fonts = tuple(font_dir / name for name in _FONT_FILES if (font_dir / name).is_file())
    if not fonts:
        raise FileNotFoundError(f"{font_dir}: none of {', '.join(_FONT_FILES)} found")
    return _Sources(digits, tuple(photos), tuple(faces), small_faces, fonts)


# --------------------------------------------------------------------------------------------------
# Non-garment generators: each takes (rng, sources) and returns one image


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): log-uniform longer side in 28..400, aspect 0.6..1.67."""
    side = float(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE))))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6))))
    width, height = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    return max(MIN_SIDE, round(width)), max(MIN_SIDE, round(height))


def _random_mode(img: Image.Image, rng: np.random.Generator, p_gray: float = 0.5) -> Image.Image:
    """Return ``img`` as 'L' with probability ``p_gray``, else as 'RGB'."""
    return img.convert("L" if rng.random() < p_gray else "RGB")


def _fit(img: Image.Image) -> Image.Image:
    """Downscale so the longer side is at most 400 px (keeps the aspect)."""
    if max(img.size) <= MAX_SIDE:
        return img
    scale = MAX_SIDE / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)


def _digit(rng: np.random.Generator, src: _Sources) -> Image.Image:
    count = 1 if rng.random() < 0.7 else int(rng.integers(2, 5))
    tiles = src.digits[rng.integers(len(src.digits), size=count)] / 16.0  # (count, 8, 8) ink 0..1
    strip = np.concatenate(list(tiles), axis=1)
    pad = int(rng.integers(0, 3))
    strip = np.pad(strip, pad)
    width, height = _random_size(rng)
    height = max(MIN_SIDE, round(width * strip.shape[0] / strip.shape[1] * rng.uniform(0.85, 1.15)))
    ink = Image.fromarray((strip * 255).astype(np.uint8)).resize((width, min(height, MAX_SIDE)), Image.BICUBIC)
    arr = np.asarray(ink, dtype=np.float32)
    if rng.random() < 0.5:  # dark ink on paper
        arr = rng.uniform(220, 255) - arr * rng.uniform(0.7, 0.95)
    else:  # light on dark (MNIST-like)
        arr = rng.uniform(0, 30) + arr * rng.uniform(0.75, 1.0)
    return _random_mode(to_image(arr), rng)


def _photo(rng: np.random.Generator, src: _Sources) -> Image.Image:
    photo = src.photos[rng.integers(len(src.photos))]
    frac = rng.uniform(0.2, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6))))
    cw = int(min(photo.width, max(8, photo.width * frac * min(1.0, aspect))))
    ch = int(min(photo.height, max(8, photo.height * frac * min(1.0, 1 / aspect))))
    x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    crop = photo.crop((x0, y0, x0 + cw, y0 + ch))
    side = float(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE))))
    scale = side / max(cw, ch)
    out = crop.resize((max(MIN_SIDE, round(cw * scale)), max(MIN_SIDE, round(ch * scale))), Image.LANCZOS)
    return _random_mode(out, rng, p_gray=0.3)


def _face(rng: np.random.Generator, src: _Sources) -> Image.Image:
    use_small = len(src.small_faces) > 0 and rng.random() < 0.4
    if use_small:
        face = Image.fromarray((src.small_faces[rng.integers(len(src.small_faces))] * 255).astype(np.uint8))
    else:
        face = src.faces[rng.integers(len(src.faces))]
    # Jitter the crop: shrink by up to 15 % and shift within the box.
    w, h = face.size
    cw, ch = int(w * rng.uniform(0.85, 1.0)), int(h * rng.uniform(0.85, 1.0))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    face = face.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        face = face.transpose(Image.FLIP_LEFT_RIGHT)
    side = float(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE))))
    scale = side / max(face.size)
    face = face.resize((max(MIN_SIDE, round(face.width * scale)), max(MIN_SIDE, round(face.height * scale))),
                       Image.BICUBIC)
    arr = np.asarray(face.convert("RGB"), dtype=np.float32)
    arr = arr * rng.uniform(0.75, 1.2) + rng.uniform(-20, 20)  # exposure
    arr = arr * rng.uniform(0.9, 1.1, size=3)  # white balance
    return _random_mode(to_image(arr), rng, p_gray=0.4)


def _text(rng: np.random.Generator, src: _Sources) -> Image.Image:
    lines = [str(_WORDS[i]) for i in rng.integers(len(_WORDS), size=int(rng.integers(1, 4)))]
    if rng.random() < 0.3:
        lines = [line.upper() for line in lines]
    font = ImageFont.truetype(str(src.fonts[rng.integers(len(src.fonts))]), int(rng.integers(10, 64)))
    text = "\n".join(lines)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font, spacing=4)
    margin_x, margin_y = int(rng.integers(2, 40)), int(rng.integers(2, 40))
    width, height = right - left + 2 * margin_x, bottom - top + 2 * margin_y
    dark_on_light = rng.random() < 0.6
    paper = rng.uniform(215, 255, size=3) if dark_on_light else rng.uniform(0, 50, size=3)
    ink = rng.uniform(0, 60, size=3) if dark_on_light else rng.uniform(200, 255, size=3)
    img = Image.new("RGB", (max(MIN_SIDE, width), max(MIN_SIDE, height)), tuple(int(v) for v in paper))
    ImageDraw.Draw(img).multiline_text((margin_x - left, margin_y - top), text, font=font,
                                       fill=tuple(int(v) for v in ink), spacing=4)
    return _random_mode(_fit(img), rng, p_gray=0.5)


def _noise(rng: np.random.Generator, src: _Sources) -> Image.Image:
    width, height = _random_size(rng)
    channels = 3 if rng.random() < 0.5 else 1
    shape = (height, width, channels)
    kind = rng.integers(4)
    if kind == 0:  # uniform
        arr = rng.uniform(0, 255, size=shape)
    elif kind == 1:  # gaussian around a random level
        arr = rng.normal(rng.uniform(60, 200), rng.uniform(15, 70), size=shape)
    elif kind == 2:  # salt and pepper on a flat grey
        arr = np.full(shape, rng.uniform(0, 255))
        hits = rng.random(size=(height, width)) < rng.uniform(0.02, 0.3)
        arr[hits] = rng.choice([0.0, 255.0], size=int(hits.sum()))[:, None]
    else:  # smooth blobs: blurred noise, contrast-stretched, sometimes thresholded
        small = rng.uniform(0, 255, size=(max(2, height // 12), max(2, width // 12), channels))
        img = to_image(small[..., 0] if channels == 1 else small).resize((width, height), Image.BICUBIC)
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(1, 6))), dtype=np.float32)
        arr = arr.reshape(shape)
        arr = (arr - arr.mean()) / (arr.std() + 1e-6) * 70 + 128
        if rng.random() < 0.4:
            arr = np.where(arr > 128, 255.0, 0.0)
    arr = arr[..., 0] if channels == 1 else arr
    return to_image(arr)


def _star(cx: float, cy: float, r_out: float, r_in: float, points: int, phase: float) -> list[tuple[float, float]]:
    angles = phase + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def _shape(rng: np.random.Generator, src: _Sources) -> Image.Image:
    width, height = _random_size(rng)
    rgb = rng.random() < 0.5
    bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    fg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    if sum(abs(a - b) for a, b in zip(bg, fg)) < 150:  # keep the shape visible
        fg = tuple(255 - v for v in bg)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    kind = rng.integers(6)
    if kind == 0:  # circles / discs / rings
        for _ in range(int(rng.integers(1, 5))):
            r = short * rng.uniform(0.1, 0.45)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            outline = int(max(1, r * rng.uniform(0.05, 0.3))) if rng.random() < 0.4 else None
            box = (cx - r, cy - r, cx + r, cy + r)
            draw.ellipse(box, outline=fg, width=outline) if outline else draw.ellipse(box, fill=fg)
    elif kind == 1:  # star
        r = short * rng.uniform(0.25, 0.48)
        draw.polygon(_star(width / 2, height / 2, r, r * rng.uniform(0.35, 0.6), int(rng.integers(4, 9)),
                           rng.uniform(0, np.pi)), fill=fg)
    elif kind == 2:  # grid of lines
        step = max(3, int(short * rng.uniform(0.06, 0.25)))
        line = max(1, int(step * rng.uniform(0.08, 0.3)))
        for x in range(int(rng.integers(0, step)), width, step):
            draw.line([(x, 0), (x, height)], fill=fg, width=line)
        for y in range(int(rng.integers(0, step)), height, step):
            draw.line([(0, y), (width, y)], fill=fg, width=line)
    elif kind == 3:  # checkerboard
        step = max(2, int(short * rng.uniform(0.05, 0.25)))
        for y in range(0, height, step):
            for x in range(0, width, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=fg)
    elif kind == 4:  # stripes, any angle
        step = max(3, int(short * rng.uniform(0.06, 0.2)))
        line = max(1, int(step * rng.uniform(0.3, 0.6)))
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle), np.sin(angle)
        reach = width + height
        for k in range(-reach, reach, step):
            cx, cy = width / 2 + k * -dy, height / 2 + k * dx
            draw.line([(cx - reach * dx, cy - reach * dy), (cx + reach * dx, cy + reach * dy)], fill=fg, width=line)
    else:  # random polygons / rectangles / triangles
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(3, 7))
            cx, cy, r = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height, short * rng.uniform(0.15, 0.4)
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles],
                         fill=tuple(int(v) for v in rng.integers(0, 256, size=3)) if rgb else fg)
    return img if rgb else img.convert("L")


def _mnist_digit(rng: np.random.Generator, src: _Sources) -> Image.Image:
    """One handwritten digit the MNIST way, the classic companion of Fashion-MNIST: a light digit whose box is
    scaled to 20 px, centred on a black 28x28 canvas by its centre of mass, as an 8-bit grayscale PNG."""
    ink = src.digits[rng.integers(len(src.digits))] / 16.0  # (8, 8) ink 0..1
    up = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize((40, 40), Image.BICUBIC), dtype=np.float32)
    up = np.clip((up - 40.0) * 1.3, 0, 255)  # sharpen the upscaled strokes' fall-off
    rows, cols = np.flatnonzero(up.max(axis=1) > 30), np.flatnonzero(up.max(axis=0) > 30)
    up = up[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = 20.0 / max(up.shape)
    digit = np.asarray(Image.fromarray(up.astype(np.uint8)).resize(
        (max(1, round(up.shape[1] * scale)), max(1, round(up.shape[0] * scale))), Image.LANCZOS), dtype=np.float32)
    yy, xx = np.mgrid[: digit.shape[0], : digit.shape[1]]
    mass = digit.sum() or 1.0
    cy, cx = (yy * digit).sum() / mass, (xx * digit).sum() / mass
    top, left = int(round(14 - cy)), int(round(14 - cx))
    top, left = min(max(top, 0), 28 - digit.shape[0]), min(max(left, 0), 28 - digit.shape[1])
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return to_image(canvas * rng.uniform(0.85, 1.0))


_GENERATORS: dict[str, Callable[[np.random.Generator, _Sources], Image.Image]] = {
    "digits": _digit, "photos": _photo, "faces": _face, "text": _text, "noise": _noise, "shapes": _shape,
    "mnist_digits": _mnist_digit,
}


def non_garment_sets(n_per_set: int, seed: int) -> dict[str, list[Image.Image]]:
    """Out-of-distribution images: ``n_per_set`` per set, deterministic given ``seed``.

    Sizes range from 28x28 to about 400x400 (the longer side is log-uniform), modes
    are a mix of 'L' and 'RGB'.  Each set has its own generator
    ``np.random.default_rng([seed, index of the set in NON_GARMENT_SETS])``, so one set
    does not change when another is edited.  Source data, all read from installed
    packages (``<site-packages>/...``) or drawn by code, never downloaded:

    - ``digits``: scikit-learn ``sklearn.datasets.load_digits()``, i.e.
      ``sklearn/datasets/data/digits.csv.gz`` (1,797 8x8 handwritten digits); one to
      four digits side by side, bicubic-upscaled, dark-on-paper or light-on-dark.
    - ``photos``: random crops (20-100 % of a side, varied aspect) resized to 28-400 px of
      ``sklearn/datasets/images/china.jpg`` and ``flower.jpg`` (``load_sample_images()``),
      ``matplotlib/mpl-data/sample_data/grace_hopper.jpg``, and, if scikit-image is
      installed, the files shipped in its wheel under ``skimage/data/``: astronaut.png,
      coffee.png, chelsea.png, rocket.jpg, camera.png, coins.png, brick.png, grass.png,
      gravel.png, moon.png, hubble_deep_field.jpg, motorcycle_left.png, retina.jpg,
      ihc.png (read from disk directly; ``skimage.data``'s pooch fetcher is
      never called).
    - ``faces``: the face box of ``matplotlib/mpl-data/sample_data/grace_hopper.jpg``,
      of ``skimage/data/astronaut.png`` and (40 % of draws) the 100 face rows of
      ``skimage/data/lfw_subset.npy`` (25x25 LFW faces); crop jitter, mirror,
      exposure and white-balance changes, greyscale or colour.
    - ``text``: one to three lines from a built-in word list, rendered with Pillow in
      the DejaVu fonts shipped with matplotlib (``matplotlib/mpl-data/fonts/ttf/
      DejaVuSans.ttf``, ``DejaVuSans-Bold.ttf``, ``DejaVuSerif.ttf``,
      ``DejaVuSansMono.ttf``, ``DejaVuSans-Oblique.ttf``), dark-on-light or light-on-dark.
    - ``noise``: generated: uniform, gaussian, salt-and-pepper, smooth (optionally
      thresholded) blobs; grey or colour.
    - ``shapes``: generated with ``PIL.ImageDraw``: discs and rings, stars, line grids,
      checkerboards, stripes at any angle, random polygons.
    - ``mnist_digits``: scikit-learn's digits again, made the MNIST way (the Fashion-MNIST vs MNIST
      benchmark pair): one light digit, its box scaled to 20 px and centred by its centre of mass on a
      black 28x28 canvas, 8-bit grayscale.

    Args:
        n_per_set: images per set (>= 0).
        seed: fixes every set.

    Returns:
        ``{name: [PIL.Image, ...]}`` with the names of :data:`NON_GARMENT_SETS`, in that order.
    """
    if n_per_set < 0:
        raise ValueError(f"n_per_set must be >= 0, got {n_per_set}")
    sources = _load_sources()
    sets = {}
    for index, name in enumerate(NON_GARMENT_SETS):
        rng = np.random.default_rng([seed, index])
        sets[name] = [_GENERATORS[name](rng, sources) for _ in range(n_per_set)]
    return sets


# --------------------------------------------------------------------------------------------------
# CLI: contact sheet


def _thumbnail(img: Image.Image, cell: int) -> Image.Image:
    """Fit ``img`` into a ``cell`` square on a mid-grey tile (so the frame's edges show), captioned with its size."""
    tile = Image.new("RGB", (cell, cell + 14), (128, 128, 128))
    scale = min((cell - 4) / img.width, (cell - 4) / img.height)
    shown = img.convert("RGB").resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                      Image.NEAREST if scale >= 2 else Image.LANCZOS)
    tile.paste(shown, ((cell - shown.width) // 2, (cell - shown.height) // 2))
    ImageDraw.Draw(tile).text((3, cell), f"{img.width}x{img.height} {img.mode}", fill=(255, 255, 255))
    return tile


def contact_sheet(rows: dict[str, list[Image.Image]], cell: int = 150) -> Image.Image:
    """One labelled row per entry of ``rows``, each image fitted into a ``cell``-pixel square."""
    label_width, per_row = 130, max(len(images) for images in rows.values())
    sheet = Image.new("RGB", (label_width + per_row * (cell + 4), len(rows) * (cell + 18)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(rows.items()):
        y = r * (cell + 18)
        draw.text((6, y + cell // 2), name, fill=(0, 0, 0))
        for c, img in enumerate(images):
            sheet.paste(_thumbnail(img, cell), (label_width + c * (cell + 4), y + 2))
    return sheet


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a contact sheet of garment photo styles and non-garment sets.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="folder with images-idx3-ubyte.gz (Fashion-MNIST, white on black)")
    p.add_argument("--out", type=Path, default=Path("build/contact_sheet.png"))
    p.add_argument("--per-row", type=int, default=8, help="examples per style / set")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> None:
    images = read_idx(args.data / "images-idx3-ubyte.gz")
    picks = np.random.default_rng(args.seed).choice(len(images), size=args.per_row, replace=False)
    garments = images[picks]
    rows: dict[str, list[Image.Image]] = {"original (28x28)": [Image.fromarray(g) for g in garments]}
    for style in STYLES:
        rows[style] = render_all(garments, style, args.seed)
    for name, imgs in non_garment_sets(args.per_row, args.seed).items():
        rows[f"not a garment: {name}"] = imgs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows).save(args.out)
    print(f"wrote {args.out} ({len(rows)} rows x {args.per_row})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
