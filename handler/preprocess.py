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
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from handler import decode, v2
from handler.canonical import Canonical, canonicalise
from handler.decode import FULL, Need
from handler.errors import InvalidImage, RequestError, UnsupportedMediaType
from handler.request import PROBE_HEADER, Options, header_options, parse_request
from handler.spec import Limits, ModelSpec

logger = logging.getLogger(__name__)

# The decoded image's relevant side is kept at least this many times the size the resize policy brings it to,
# so the final resampling still filters: measured by scripts/evaluate/decode_scale.py (docs/decode_scale.md),
# 1.5x keeps a 224x224 input within 0.2 grey levels of a full decode's on average, 1x within 0.3.
DECODE_MARGIN = 1.5
# Re-exported for callers of the former single module.
ACCEPTED_FORMATS, ACCEPTED_HUMAN = decode.ACCEPTED_FORMATS, decode.ACCEPTED_HUMAN


def need(spec: ModelSpec) -> Need:
    """How large a decoded upload must stay for this spec's next stage (``handler.decode.Need``).

    - canonicalisation: the long side at least ``canonical.decode_size`` (256 for fashion_cnn: a
      4000x3000 JPEG decodes at 1/8; the answers then agree with a decode of every pixel, measured
      in docs/decode_scale.md);
    - ``crop``: the shorter side at least ``resize_size`` x ``DECODE_MARGIN``;
    - ``pad`` / ``stretch``: the long / short side at least the input's larger side x ``DECODE_MARGIN``.
    """
    if spec.canonical is not None:
        return Need(long=spec.canonical.decode_size)
    if spec.resize == "crop":
        return Need(short=math.ceil(spec.resize_size * DECODE_MARGIN))
    side = math.ceil(max(spec.input_size) * DECODE_MARGIN)
    return Need(long=side) if spec.resize == "pad" else Need(short=side)


def decode_image(data: bytes, limits: Limits = Limits(), need: Need = FULL, background: tuple[int, ...] = (0,)) -> Image.Image:
    """Untrusted bytes -> an upright 8-bit 'L'/'RGB' image at least ``need`` large, or a RequestError."""
    return decode.decode(data, limits.max_pixels, limits.max_frames, need, background)


def upright_8bit(img: Image.Image, spec: ModelSpec) -> Image.Image:
    """Reduce the image to what the spec needs, upright it, and bring any Pillow mode to 8-bit 'L' or 'RGB',
    keeping its colour: what ``decode_image`` makes of the same picture sent as a PNG.

    Transparent pixels are composited onto ``spec.background`` (not dropped), so a
    transparent PNG looks like the training data's background.
    """
    return decode.upright(img, spec.background, need(spec))


def model_mode(spec: ModelSpec) -> str:
    return "L" if spec.channels == 1 else "RGB"


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
    """8-bit 'L'/'RGB' image of the input size -> float32 tensor (C, H, W), normalised.

    Through a per-channel table of the 256 possible values, made by the very float32 operations
    (``/ 255``, ``- mean``, ``/ std``) the per-pixel form applies: the same bits, one lookup per pixel."""
    table = _normalisation(spec.mean, spec.std)
    arr = np.asarray(img)
    if arr.ndim == 2:
        return torch.from_numpy(table[0][arr][None])
    return torch.from_numpy(np.stack([table[c][arr[..., c]] for c in range(arr.shape[2])]))


@functools.lru_cache(maxsize=8)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: ((v / 255) - mean) / std for every 8-bit v, computed once per spec."""
    values = torch.arange(256, dtype=torch.uint8).to(torch.float32).div_(255.0).expand(len(mean), 256).clone()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1)
    return values.sub_(mean_t).div_(std_t).numpy()


def canonical_image(img: Image.Image, spec: ModelSpec) -> Canonical:
    """The image the model sees, in its mode and size, with the raw-image signals, for any PIL image.

    With ``spec.canonical`` the photo is canonicalised (``handler.canonical``);
    without it, it is resized by ``spec.resize`` and has no signals.
    """
    return _canonical(upright_8bit(img, spec), spec)


def _canonical(img: Image.Image, spec: ModelSpec) -> Canonical:
    """``canonical_image`` of an image that is already upright and 8-bit 'L' or 'RGB' (``handler.decode``'s output)."""
    if spec.canonical is None:
        target = model_mode(spec)
        return Canonical(resize(img if img.mode == target else img.convert(target), spec), (), False)
    return canonicalise(img, spec.canonical, spec.input_size, model_mode(spec), spec.background)


def _input(canonical: Canonical, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    signals = torch.tensor(canonical.signals, dtype=torch.float32) if canonical.signals else None
    return to_tensor(canonical.image, spec), signals


def image_to_input(img: Image.Image, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one preprocessing path shared by training and serving, for a decoded PIL image: (tensor, signals or None).

    Uploads take ``bytes_to_input``, which decodes no larger than needed and then runs the same stages."""
    return _input(canonical_image(img, spec), spec)


def image_to_tensor(img: Image.Image, spec: ModelSpec) -> torch.Tensor:
    """``image_to_input`` without the signals: training's eval transform."""
    return image_to_input(img, spec)[0]


def bytes_to_canonical(data: bytes, spec: ModelSpec) -> Canonical:
    """Untrusted bytes -> the image the model sees (with its signals and the region it came from), or a
    RequestError naming the problem: decode (``handler.decode``: limits, the needed scale, upright, 8-bit),
    then canonicalise or resize."""
    img = decode_image(data, spec.limits, need(spec), spec.background)
    try:
        return _canonical(img, spec)
    except Exception as exc:  # a decodable image Pillow still cannot convert is the client's
        raise InvalidImage(f"The image in mode {img.mode} ({img.size[0]}x{img.size[1]} decoded) could not be "
                           f"converted: {exc}.") from None


def bytes_to_input(data: bytes, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Untrusted bytes -> (model input tensor, signals), or a RequestError naming the problem.

    request bytes -> decode -> canonicalise or resize (``bytes_to_canonical``) -> tensor; training's photos
    take this same path (``scripts.train.data.eval_inputs`` on the JPEG bytes)."""
    return _input(bytes_to_canonical(data, spec), spec)


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
    # Per image, where in the upright upload the object was found (left, top, right, bottom as shares of its
    # width and height; None: nothing found, or no canonicalisation): /explanations shows it.
    regions: tuple = ()


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
        tensors, signals, regions = [], [], []
        for i, data in enumerate(parsed.images):
            try:
                canonical = bytes_to_canonical(data, spec)
                tensor, signal = _input(canonical, spec)
                tensors.append(tensor)
                signals.append(signal)
                regions.append(canonical.region)
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
                    probe=headers.get(PROBE_HEADER, "").lower() == "true", regions=tuple(regions))
