"""Image bytes -> normalised tensor, exactly as training's eval transform does it.

``image_to_input(img, spec)`` is THE preprocessing function (decode -> upright ->
canonicalise or resize -> tensor): training's datasets call it on PIL images built
from IDX arrays and rendered photos, and the handler calls it on decoded uploads,
so the two cannot drift apart.  ``decode_image`` is the
hardened front half used for untrusted bytes: it enforces the pixel and frame
limits from the image header before any pixel is decoded and turns every
decoder failure into a named 4xx error.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from handler import v2
from handler.canonical import Canonical, canonicalise
from handler.errors import EmptyRequest, ImageTooLarge, InvalidImage, RequestError, UnsupportedMediaType
from handler.request import PROBE_HEADER, Options, header_options, parse_request
from handler.spec import Limits, ModelSpec

logger = logging.getLogger(__name__)

# Raster formats Pillow may decode here.  Restricting the list keeps exotic
# decoders (EPS via Ghostscript, PSD, ...) away from untrusted input.
Image.init()
ACCEPTED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF") if f in Image.OPEN)
ACCEPTED_HUMAN = "JPEG, PNG, GIF, WebP, BMP or TIFF"

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _describe_bytes(data: bytes) -> str:
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


def _signature(data: bytes) -> str | None:
    """The accepted format whose magic bytes ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _bomb(exc: Exception, limits: Limits) -> ImageTooLarge:
    found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow: "Image size (N pixels) exceeds limit of ..."
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than can be decoded safely"
    return ImageTooLarge(
        f"The image header claims {size}; the limit is {limits.max_pixels:,} pixels. Downscale it before sending."
    )


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


def decode_image(data: bytes, limits: Limits = Limits()) -> Image.Image:
    """Decode untrusted bytes into a loaded PIL image (first frame), or raise a RequestError."""
    if not data:
        raise EmptyRequest(
            "The request has no image. Send the image bytes as the request body, as a multipart "
            'field "data", "file" or "image", or as JSON {"image": "<base64>"}.'
        )
    with warnings.catch_warnings():
        # limits.max_pixels, checked below from the header, decides.  Pillow's warning at
        # MAX_IMAGE_PIXELS (~89 MP) would cap a larger configured limit; its error at twice
        # that stays as a hard ceiling.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise _bomb(exc, limits) from None
        except Image.UnidentifiedImageError:
            looks_like = _describe_bytes(data)
            started = _signature(data) if looks_like == "unrecognised binary data" else None
            if started:
                raise InvalidImage(
                    f"The data starts like a {started} file, but its header is truncated or corrupt. "
                    "Send the complete file."
                ) from None
            raise UnsupportedMediaType(
                f"The data is not an image in an accepted format (it looks like {looks_like}). "
                f"Accepted formats: {ACCEPTED_HUMAN}."
            ) from None
        except Exception as exc:  # any decoder failure on untrusted bytes is the client's bad image
            started = _signature(data)
            if started:
                raise InvalidImage(
                    f"The data starts like a {started} file, but it is truncated or corrupt ({exc}). Send the complete file."
                ) from None
            raise InvalidImage(f"The image could not be read: {exc}. Send a complete {ACCEPTED_HUMAN} file.") from None

        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidImage(f"The image has no pixels ({width}x{height}).")
        if width * height > limits.max_pixels:
            raise ImageTooLarge(
                f"The image is {width}x{height} = {width * height:,} pixels; the limit is "
                f"{limits.max_pixels:,} pixels. Downscale it before sending."
            )
        try:
            frames = _tiff_pages(data, limits.max_frames) if img.format == "TIFF" else getattr(img, "n_frames", 1)
            if frames > limits.max_frames:
                counted = f"more than {limits.max_frames}" if img.format == "TIFF" else f"{frames}"
                raise ImageTooLarge(
                    f"The image has {counted} frames; the limit is {limits.max_frames}. "
                    "Send a single frame or a shorter animation."
                )
            if frames > 1:
                img.seek(0)  # animated images are classified on their first frame
            img.load()
        except ImageTooLarge:
            raise
        except Image.DecompressionBombError as exc:
            raise _bomb(exc, limits) from None
        except Exception as exc:
            raise InvalidImage(
                f"The {img.format} image is corrupt or truncated ({exc}). Send the complete file."
            ) from None
    return img


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block must not cost the client its answer
        logger.warning("Ignoring unreadable EXIF orientation: %s", exc)
        return img


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
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
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def upright_8bit(img: Image.Image, spec: ModelSpec) -> Image.Image:
    """Upright the image and bring any Pillow mode to 8-bit 'L' or 'RGB', keeping its colour.

    Transparent pixels are composited onto ``spec.background`` (not dropped), so a
    transparent PNG looks like the training data's background.
    """
    img = _exif_upright(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_depth_to_8bit(img)
    has_alpha = img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        bg = spec.background if len(spec.background) == 3 else spec.background * 3
        base = Image.new("RGBA", img.size, (*bg, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img


def model_mode(spec: ModelSpec) -> str:
    return "L" if spec.channels == 1 else "RGB"


def to_model_mode(img: Image.Image, spec: ModelSpec) -> Image.Image:
    """Upright the image and convert any Pillow mode to 'L' or 'RGB' as the spec asks."""
    img = upright_8bit(img, spec)
    target = model_mode(spec)
    return img if img.mode == target else img.convert(target)


def resize(img: Image.Image, spec: ModelSpec) -> Image.Image:
    """Bring the image to ``spec.input_size`` with the spec's policy (bilinear, antialiased)."""
    height, width = spec.input_size
    w, h = img.size
    if (w, h) == (width, height):
        return img
    if spec.resize == "stretch":
        return img.resize((width, height), Image.BILINEAR)
    if spec.resize == "crop":
        short, long_ = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.resize_size, max(1, int(spec.resize_size * long_ / short))
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top = int(round((new_h - height) / 2.0))
        left = int(round((new_w - width) / 2.0))
        # Resize only the centre crop's source region (``box``): the same sampling grid as resizing the whole
        # image to (new_w, new_h) and cropping, within one 8-bit level, at a fraction of the pixels.
        sx, sy = w / new_w, h / new_h
        return img.resize((width, height), Image.BILINEAR,
                          box=(left * sx, top * sy, (left + width) * sx, (top + height) * sy))
    # "pad": fit inside the input size keeping the aspect ratio, centre on the background.
    scale = min(width / w, height / h)
    new_w, new_h = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    fitted = img.resize((new_w, new_h), Image.BILINEAR)
    fill = spec.background[0] if spec.channels == 1 else tuple(spec.background)
    canvas = Image.new(img.mode, (width, height), fill)
    canvas.paste(fitted, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def to_tensor(img: Image.Image, spec: ModelSpec) -> torch.Tensor:
    """8-bit 'L'/'RGB' image of the input size -> float32 tensor (C, H, W), normalised."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    tensor = torch.from_numpy(arr)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    tensor = tensor.to(torch.float32).div_(255.0)
    mean, std = _normalisation(spec.mean, spec.std)
    return tensor.sub_(mean).div_(std).contiguous()


@functools.lru_cache(maxsize=8)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as (C, 1, 1) tensors, built once per spec rather than once per image."""
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def canonical_image(img: Image.Image, spec: ModelSpec) -> Canonical:
    """The image the model sees, in its mode and size, with the raw-image signals.

    With ``spec.canonical`` the photo is canonicalised (``handler.canonical``);
    without it, it is resized by ``spec.resize`` and has no signals.
    """
    if spec.canonical is None:
        return Canonical(resize(to_model_mode(img, spec), spec), (), False)
    return canonicalise(upright_8bit(img, spec), spec.canonical, spec.input_size, model_mode(spec), spec.background)


def image_to_input(img: Image.Image, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one preprocessing path shared by training and serving: (tensor, signals or None)."""
    canonical = canonical_image(img, spec)
    signals = torch.tensor(canonical.signals, dtype=torch.float32) if canonical.signals else None
    return to_tensor(canonical.image, spec), signals


def image_to_tensor(img: Image.Image, spec: ModelSpec) -> torch.Tensor:
    """``image_to_input`` without the signals: training's eval transform."""
    return image_to_input(img, spec)[0]


def bytes_to_input(data: bytes, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Untrusted bytes -> (model input tensor, signals), or a RequestError naming the problem."""
    img = decode_image(data, spec.limits)
    try:
        return image_to_input(img, spec)
    except Exception as exc:  # a decodable image Pillow still cannot convert is the client's
        raise InvalidImage(f"The {img.format} image in mode {img.mode} could not be converted: {exc}.") from None


def bytes_to_tensor(data: bytes, spec: ModelSpec) -> torch.Tensor:
    return bytes_to_input(data, spec)[0]


@dataclass(frozen=True)
class Prepared:
    """A request that parsed and decoded: its tensors, options, and how to answer it."""

    tensors: list[torch.Tensor]
    signals: list[torch.Tensor | None]  # raw-image signals per image (None without canonicalisation)
    options: list[Options]
    is_list: bool  # {"instances": [...]}: answer with a list
    explain: bool  # /explanations: add the per-view breakdown
    v2: dict | None = None  # an Open Inference Protocol request: its id and the outputs asked for
    probe: bool = False  # a readiness probe (PROBE_HEADER): answered, but kept out of the quality metrics


DESCRIBE = "describe"  # a request carrying the describe header: answered with the model's description
V2_METADATA = "v2-metadata"  # the same through the v2 protocol (GET /v2/models/<m> at the gateway)


def prepare(item, headers: dict[str, str], spec: ModelSpec) -> Prepared | RequestError | str:
    """One request -> Prepared, the RequestError to answer it with, DESCRIBE or V2_METADATA. Never raises RequestError."""
    is_v2 = v2.requested(headers)
    if headers.get("describe", "").lower() == "true":
        return V2_METADATA if is_v2 else DESCRIBE
    meta = None
    try:
        if is_v2:
            parsed, meta = v2.parse(item, header_options(headers, spec.class_names), spec.class_names,
                                    spec.limits.max_instances, headers)
        else:
            parsed = parse_request(item, headers, spec.class_names, spec.limits.max_instances)
        tensors, signals = [], []
        for i, data in enumerate(parsed.images):
            try:
                tensor, signal = bytes_to_input(data, spec)
                tensors.append(tensor)
                signals.append(signal)
            except RequestError as exc:
                if parsed.from_json and isinstance(exc, UnsupportedMediaType):  # the JSON body itself was fine
                    exc = InvalidImage(f'"image" holds valid base64, but {exc.message[0].lower()}{exc.message[1:]}')
                if is_v2:
                    exc.message = f"inputs[{v2.INPUT}].data[{i}]: {exc.message}"
                elif parsed.is_list:
                    exc.message = f"instances[{i}]: {exc.message}"
                raise exc from None
    except RequestError as exc:
        exc.v2 = is_v2  # answered in the v2 error shape
        return exc
    return Prepared(tensors, signals, parsed.options, parsed.is_list, headers.get("explain", "").lower() == "true", meta,
                    probe=headers.get(PROBE_HEADER, "").lower() == "true")
