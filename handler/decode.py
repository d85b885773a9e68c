"""Untrusted bytes -> an upright 8-bit image, decoded only as large as the model needs.

``decode(data, limits, need, background)`` is the hardened front of the preprocessing path:

1. the format is recognised by content (:data:`ACCEPTED_FORMATS`; HEIC/HEIF through
   ``pillow-heif`` when it is installed, AVIF through Pillow's own plugin) and the pixel and
   frame limits are checked from the header, before any pixel is decoded;
2. the image is decoded at the smallest scale that still gives the later stages ``need``
   (a :class:`Need`: the shorter and the longer side the decoded image must keep):
   a JPEG (or MPO) with libjpeg's DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8 of the size
   for a fraction of the work), any other format decoded and then reduced by an integer
   factor (``Image.reduce``, a box filter) before anything looks at its pixels;
3. the EXIF orientation is applied (on the reduced image: a transpose is cheap there) and any
   mode becomes 8-bit 'L' or 'RGB', transparent pixels composited onto ``background``.

Every decoder failure becomes a named 4xx error (``handler.errors``).
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from handler.errors import EmptyRequest, ImageTooLarge, InvalidImage, UnsupportedMediaType

try:  # HEIC/HEIF (iPhone photos): optional; without it such uploads are answered 415 like any unknown format
    import pillow_heif
except ImportError:  # pragma: no cover - the serving stack installs it (pyproject.toml)
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()
    # Decode the primary image only: thumbnails, depth maps and auxiliary images are never looked at.
    pillow_heif.options.THUMBNAILS = pillow_heif.options.DEPTH_IMAGES = pillow_heif.options.AUX_IMAGES = False

logger = logging.getLogger(__name__)

# Raster formats Pillow may decode here.  Restricting the list keeps exotic
# decoders (EPS via Ghostscript, PSD, ...) away from untrusted input.
Image.init()
ACCEPTED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "HEIF", "AVIF") if f in Image.OPEN)
_HUMAN = {"JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF", "HEIF": "HEIC/HEIF",
          "AVIF": "AVIF"}
_NAMES = [_HUMAN[f] for f in ACCEPTED_FORMATS if f != "MPO"]
ACCEPTED_HUMAN = ", ".join(_NAMES[:-1]) + " or " + _NAMES[-1]  # "JPEG, PNG, ..., HEIC/HEIF or AVIF"
_DRAFTABLE = ("JPEG", "MPO")  # decoded with DCT scaling

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Modes Image.reduce handles as they are; any other (palette, 1-bit, CMYK, ...) is converted first.
_REDUCIBLE = {"L", "RGB", "RGBA", "LA", "I", "F", "La", "RGBa"}
# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class Need:
    """The smallest decoded size the later stages can use: its shorter side at least ``short`` and its
    longer side at least ``long`` pixels (0: no constraint; an image smaller than that is used as it is)."""

    short: int = 0
    long: int = 0

    def factor(self, width: int, height: int, limit: int | None = None) -> int:
        """The largest integer reduction that keeps this need (at most ``limit``), 1 if none."""
        if not self.short and not self.long:
            return 1  # no need stated: every pixel
        short, long_ = min(width, height), max(width, height)
        factor = min(short // self.short if self.short else short, long_ // self.long if self.long else long_)
        return max(1, min(factor, limit or factor))


FULL = Need()  # decode every pixel (what a caller that does its own resizing asks for)


def threads(count: int) -> None:
    """Threads the AVIF and HEIF decoders may use in this process (a worker's share of the cores)."""
    try:
        from PIL import AvifImagePlugin

        AvifImagePlugin.DEFAULT_MAX_THREADS = count
    except ImportError:  # pragma: no cover - Pillow without AVIF
        pass
    if pillow_heif is not None:
        pillow_heif.options.DECODE_THREADS = count


def describe_bytes(data: bytes) -> str:
    head = data[:512].lstrip()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    lowered = head.lower()
    if b"<svg" in lowered or (lowered.startswith(b"<?xml") and b"svg" in data[:4096].lower()):
        return "an SVG drawing (vector images are not decoded; rasterise it first)"
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith((b"{", b"[")):
        return "JSON"
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    if all(ch.isprintable() or ch.isspace() for ch in text):
        return "plain text"
    return "unrecognised binary data"


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF",
                b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


def signature(data: bytes) -> str | None:
    """The accepted format whose magic bytes ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:  # ISO base media file: HEIC and AVIF
        return _HEIF_BRANDS[data[8:12]]
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _a(name: str) -> str:
    """'a PNG', 'an AVIF'."""
    return f"an {name}" if name[:1] in "AEIOU" else f"a {name}"


def _bomb(exc: Exception, max_pixels: int) -> ImageTooLarge:
    found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow: "Image size (N pixels) exceeds limit of ..."
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than can be decoded safely"
    return ImageTooLarge(f"The image header claims {size}; the limit is {max_pixels:,} pixels. Downscale it before sending.")


def _tiff_pages(data: bytes, limit: int) -> int:
    """Pages of a TIFF, counted no further than ``limit + 1``.

    Pillow's ``n_frames`` walks every page in quadratic time: a 10 MB TIFF of 80,000
    tiny pages would hold a worker for minutes.  A separate probe leaves ``img`` on page 0.
    """
    probe = Image.open(io.BytesIO(data), formats=("TIFF",))
    pages = 1
    while pages <= limit:
        try:
            probe.seek(pages)
        except EOFError:
            break
        pages += 1
    return pages


def _refuse_unreadable(data: bytes) -> Exception:
    looks_like = describe_bytes(data)
    started = signature(data) if looks_like == "unrecognised binary data" else None
    if started:
        supported = started in ("WebP", "PNG", "JPEG", "GIF", "TIFF", "BMP") or (
            started in ("HEIC", "HEIF") and "HEIF" in ACCEPTED_FORMATS) or (started == "AVIF" and "AVIF" in ACCEPTED_FORMATS)
        if not supported:
            return UnsupportedMediaType(f"The data is {_a(started)} image, which this server cannot decode. "
                                        f"Accepted formats: {ACCEPTED_HUMAN}.")
        return InvalidImage(f"The data starts like {_a(started)} file, but its header is truncated or corrupt. "
                            "Send the complete file.")
    return UnsupportedMediaType(f"The data is not an image in an accepted format (it looks like {looks_like}). "
                                f"Accepted formats: {ACCEPTED_HUMAN}.")


def open_image(data: bytes, max_pixels: int, max_frames: int) -> Image.Image:
    """Read the header of untrusted bytes and check the limits; no pixel is decoded yet."""
    if not data:
        raise EmptyRequest(
            "The request has no image. Send the image bytes as the request body, as a multipart "
            'field "data", "file" or "image", or as JSON {"image": "<base64>"}.'
        )
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, max_pixels) from None
    except Image.UnidentifiedImageError:
        raise _refuse_unreadable(data) from None
    except Exception as exc:  # any decoder failure on untrusted bytes is the client's bad image
        started = signature(data)
        if started:
            raise InvalidImage(
                f"The data starts like {_a(started)} file, but it is truncated or corrupt ({exc}). Send the complete file."
            ) from None
        raise InvalidImage(f"The image could not be read: {exc}. Send a complete {ACCEPTED_HUMAN} file.") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImage(f"The image has no pixels ({width}x{height}).")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{max_pixels:,} pixels. Downscale it before sending."
        )
    try:
        frames = _tiff_pages(data, max_frames) if img.format == "TIFF" else getattr(img, "n_frames", 1)
    except Exception as exc:
        raise InvalidImage(f"The {_HUMAN.get(img.format, img.format)} image is corrupt or truncated ({exc}). Send the complete file.") from None
    if frames > max_frames:
        counted = f"more than {max_frames}" if img.format == "TIFF" else f"{frames}"
        raise ImageTooLarge(f"The image has {counted} frames; the limit is {max_frames}. "
                            "Send a single frame or a shorter animation.")
    return img


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when there is none or it cannot be read."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception as exc:  # a broken EXIF block must not cost the client its answer
        logger.warning("Ignoring unreadable EXIF orientation: %s", exc)
        return 1
    return value if value in _UPRIGHT else 1


def _load(img: Image.Image, need: Need) -> Image.Image:
    """Decode ``img`` (opened): its first frame, a JPEG at the smallest DCT scale that keeps ``need``."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated images are classified on their first frame
    if img.format in _DRAFTABLE:
        factor = need.factor(*img.size, limit=8)
        if factor > 1:  # libjpeg picks the largest of 1/2, 1/4, 1/8 that keeps this size
            img.draft(None, (img.size[0] // factor, img.size[1] // factor))
    img.load()
    return img


def reduce(img: Image.Image, need: Need) -> Image.Image:
    """Shrink a decoded image by the largest integer factor that keeps ``need`` (a box filter), if any."""
    factor = need.factor(*img.size)
    if factor <= 1:
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I")  # lossless; 16-bit modes are not reducible as they are
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode not in _REDUCIBLE:  # palette, CMYK, YCbCr, ...: reduce their colours, not their indices
        img = img.convert("RGBA" if _has_alpha(img) else "RGB")
    return img.reduce(factor)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer, and float, grayscale -> 8-bit 'L'.

    Integer images are scaled by their container's range (16-bit: /257); 32-bit
    integer images whose values fit 0..255 are kept as they are.  Float images
    with values in [0, 1] are scaled to 0..255; other float images are clipped
    to 0..255.  NaN becomes 0.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float64)
        peak = float(arr.max(initial=0))
        if peak > 65535:
            arr = arr * (255.0 / peak)
        elif peak > 255:
            arr = arr / 257.0
    else:  # "F"
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_8bit(img: Image.Image, background: tuple[int, ...], turn: int = 1) -> Image.Image:
    """Apply EXIF orientation ``turn`` and bring any Pillow mode to 8-bit 'L' or 'RGB', keeping its colour.

    Transparent pixels are composited onto ``background`` (1 or 3 values, 0..255), not dropped.
    """
    if turn in _UPRIGHT:
        img = img.transpose(_UPRIGHT[turn])
        img.info.pop("exif", None)  # applied: a later upright() must not turn the copy again
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = high_depth_to_8bit(img)
    if _has_alpha(img):
        bg = tuple(background) if len(background) == 3 else tuple(background) * 3
        base = Image.new("RGBA", img.size, (*bg, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img


def upright(img: Image.Image, background: tuple[int, ...], need: Need = FULL) -> Image.Image:
    """An already decoded PIL image (training's arrays, a caller's picture) reduced to ``need`` as ``decode`` does
    it, upright and in 8-bit 'L' or 'RGB': the same image ``decode`` makes of its PNG."""
    return to_8bit(reduce(img, need), background, orientation(img))


def decode(data: bytes, max_pixels: int, max_frames: int, need: Need = FULL,
           background: tuple[int, ...] = (0,)) -> Image.Image:
    """Untrusted bytes -> an upright 8-bit 'L' or 'RGB' image at least ``need`` large (or as large as it is),
    or a RequestError naming the problem."""
    with warnings.catch_warnings():
        # max_pixels, checked from the header, decides.  Pillow's warning at MAX_IMAGE_PIXELS (~89 MP)
        # would cap a larger configured limit; its error at twice that stays as a hard ceiling.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = open_image(data, max_pixels, max_frames)
        fmt = img.format
        try:
            img = _load(img, need)
        except Image.DecompressionBombError as exc:
            raise _bomb(exc, max_pixels) from None
        except Exception as exc:
            raise InvalidImage(f"The {_HUMAN.get(fmt, fmt)} image is corrupt or truncated ({exc}). Send the complete file.") from None
        turn = orientation(img)  # after loading: a PNG's eXIf chunk may follow its pixels
    mode = img.mode
    try:
        return to_8bit(reduce(img, need), background, turn)
    except Exception as exc:  # a decodable image Pillow still cannot convert is the client's
        raise InvalidImage(f"The {fmt} image in mode {mode} could not be converted: {exc}.") from None
