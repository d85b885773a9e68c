"""Every kind of input, at unit level: formats and modes reduce to the right tensor, every
bad request gets its own named 4xx inside a batch (TorchServe's real Context, no
server), limits come from model-config.yaml and are checked from the header."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from handler.preprocess import Prepared, bytes_to_tensor, image_to_tensor, prepare
from handler.tta_classifier import TTAClassifierHandler
from scripts.train.data import fashion_spec
from tests.conftest import make_context, run_batch, same_answer

SPEC = fashion_spec()
RNG = np.random.default_rng(7)
# A garment-like test image: a bright blob with texture on a black background (28x28).
_yy, _xx = np.mgrid[:28, :28]
GRAY = np.where((_yy - 14) ** 2 / 90 + (_xx - 12) ** 2 / 40 < 1, 120 + RNG.integers(0, 135, (28, 28)), 0).astype(np.uint8)
GRAY[20:24, 4:26] = 255  # asymmetric: a sole


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tensor_of(data: bytes, spec=SPEC) -> torch.Tensor:
    slot = prepare({"body": data}, {}, spec)
    assert isinstance(slot, Prepared), getattr(slot, "message", slot)
    return slot.tensors[0]


REFERENCE = image_to_tensor(Image.fromarray(GRAY), SPEC)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int, idat: bytes = b"not zlib data") -> bytes:
    """A PNG whose IHDR claims width x height (8-bit gray) but whose pixel data is ``idat``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _rgba_white_with_alpha() -> Image.Image:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = GRAY  # white garment whose opacity is its brightness: on black it is GRAY again
    return Image.fromarray(rgba, "RGBA")


def _palette_with_transparent_red() -> Image.Image:
    img = Image.fromarray(GRAY, "L").convert("P")  # 256-entry gray palette, index == value
    palette = img.getpalette()
    palette[:3] = [255, 0, 0]  # index 0 (the background) is red ...
    img.putpalette(palette)
    img.info["transparency"] = 0  # ... and transparent: it must become the black background
    return img


def _animated_gif() -> bytes:
    first = Image.fromarray(GRAY, "L")
    others = [Image.fromarray(np.roll(GRAY, 7 * i, axis=1), "L") for i in range(1, 4)]
    return encode(first, "GIF", save_all=True, append_images=others, duration=50)


LOSSLESS = {
    "png_gray": lambda: encode(Image.fromarray(GRAY), "PNG"),
    "png_16bit_gray": lambda: encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG"),
    "png_rgb": lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)), "PNG"),
    "png_rgba_composited_on_black": lambda: encode(_rgba_white_with_alpha(), "PNG"),
    "png_la_composited_on_black": lambda: encode(_rgba_white_with_alpha().convert("LA"), "PNG"),
    "png_palette_transparent_red_background": lambda: encode(_palette_with_transparent_red(), "PNG"),
    "gif_animated_first_frame": _animated_gif,
    "webp_lossless": lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)), "WEBP", lossless=True),
    "bmp": lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)), "BMP"),
    "tiff": lambda: encode(Image.fromarray(GRAY), "TIFF"),
    "tiff_16bit": lambda: encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "TIFF"),
    "tiff_float_0_1": lambda: encode(Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF"),
    "tiff_float_0_255": lambda: encode(Image.fromarray(GRAY.astype(np.float32)), "TIFF"),
    "tiff_int32": lambda: encode(Image.fromarray(GRAY.astype(np.int32)), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_formats_and_modes_give_exactly_the_grayscale_tensor(name):
    """16-bit (/257), float ([0,1] -> x255), alpha and palette transparency (onto the spec's
    black background), first GIF frame: all reduce to the very same tensor as the 8-bit image."""
    assert torch.equal(tensor_of(LOSSLESS[name]()), REFERENCE), name


@pytest.mark.parametrize("name, make", [
    ("jpeg_baseline", lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)), "JPEG", quality=95)),
    ("jpeg_progressive", lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)), "JPEG", quality=95, progressive=True)),
    ("jpeg_cmyk", lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)).convert("CMYK"), "JPEG", quality=95)),
    ("webp_lossy", lambda: encode(Image.fromarray(np.stack([GRAY] * 3, -1)), "WEBP", quality=95)),
])
def test_lossy_formats_give_nearly_the_grayscale_tensor(name, make):
    diff = (tensor_of(make()) - REFERENCE).abs() * SPEC.std[0] * 255  # in 8-bit grey levels
    assert diff.mean() < 6, (name, float(diff.mean()))


def test_one_bit_png_is_black_and_white():
    bits = encode(Image.fromarray(GRAY).convert("1", dither=Image.Dither.NONE), "PNG")
    values = set(torch.unique(tensor_of(bits) * SPEC.std[0] + SPEC.mean[0]).mul(255).round().tolist())
    assert values == {0.0, 255.0}


def test_alpha_is_composited_onto_the_configured_background_not_dropped():
    spec = fashion_spec(background=(200,))
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:14, :, 3] = 255  # top half opaque white, bottom half fully transparent white
    tensor = bytes_to_tensor(encode(Image.fromarray(rgba, "RGBA"), "PNG"), spec)
    levels = (tensor * spec.std[0] + spec.mean[0]) * 255
    assert torch.allclose(levels[0, :14], torch.full((14, 28), 255.0), atol=1e-3)
    assert torch.allclose(levels[0, 14:], torch.full((14, 28), 200.0), atol=1e-3)


@pytest.mark.parametrize("orientation, stored", [
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_90),  # camera held sideways: stored rotated, tag says turn 90 clockwise
    (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(orientation, stored):
    upright = Image.fromarray(np.stack([GRAY] * 3, -1)).resize((112, 112), Image.NEAREST)
    sideways = upright.transpose(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(sideways, "JPEG", quality=95, exif=exif.tobytes())
    untagged = encode(sideways, "JPEG", quality=95)
    got = tensor_of(tagged)
    assert (got - tensor_of(encode(upright, "JPEG", quality=95))).abs().mean() < 0.02
    assert (tensor_of(untagged) - got).abs().mean() > 0.1  # the tag, not luck, made the difference
    assert torch.equal(got, image_to_tensor(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))), SPEC))


@pytest.mark.parametrize("size", [(1, 1), (2000, 3), (3, 2000), (1, 500)])
def test_any_geometry_is_padded_into_the_input(size):
    # The resize path (a spec without canonicalisation); tests/unit/test_canonical.py covers the other.
    tensor = tensor_of(encode(Image.new("L", size, 255), "PNG"), fashion_spec(canonical=None))
    assert tensor.shape == (1, 28, 28) and torch.isfinite(tensor).all()
    assert tensor.max() > 0  # the white content survived the resize


# --- batches with TorchServe's real Context ------------------------------------------------

def _png(seed: int) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


JSON = {"Content-Type": "application/json"}
BAD = [  # (request, headers, status, type, fragment of the message)
    ({"body": b""}, {}, 400, "EmptyRequest", "has no image"),
    ({"body": b"just some text"}, {}, 415, "UnsupportedMediaType", "plain text"),
    ({"body": RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes()}, {}, 415, "UnsupportedMediaType", "JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF or AVIF"),
    ({"body": _png(1)[:60]}, {}, 400, "InvalidImage", "truncated"),
    ({"body": _png(1)[:12]}, {}, 400, "InvalidImage", "starts like a PNG file"),
    ({"body": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"}, {}, 415, "UnsupportedMediaType", "PDF"),
    ({"body": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'}, {}, 415, "UnsupportedMediaType", "SVG"),
    ({"body": png_claiming(30000, 30000)}, {}, 413, "ImageTooLarge", "900,000,000 pixels; the limit is 40,000,000"),
    ({"body": b'{"image": '}, {}, 400, "InvalidJSON", "not valid JSON"),
    ({"body": [1, 2]}, JSON, 400, "InvalidJSON", "must be an object; got list"),
    ({"body": None}, JSON, 400, "InvalidJSON", "must be an object; got null"),  # TorchServe parsed `null`
    ({"body": "aGVsbG8="}, JSON, 400, "InvalidJSON", "must be an object; got a string"),  # ... and a JSON string
    ({"body": b"42"}, {"Content-Type": "application/json; charset=utf-8"}, 400, "InvalidJSON", "got 42"),
    ({"body": {"img": "x"}}, JSON, 400, "InvalidJSON", 'has no "image" field'),
    ({"body": {"image": 7}}, JSON, 400, "InvalidJSON", "must be a base64 string"),
    ({"body": {"image": "not base64 at all!"}}, JSON, 400, "InvalidBase64", "not valid base64"),
    ({"body": {"image": b64(b"plain words")}}, JSON, 400, "InvalidImage", "valid base64, but the data is not an image"),
    ({"body": {"image": b64(_png(2)), "top_k": 0}}, JSON, 400, "InvalidOption", "from 1 to 10; got 0"),
    ({"body": {"image": b64(_png(2)), "top_k": "three"}}, JSON, 400, "InvalidOption", "from 1 to 10"),
    ({"body": {"image": b64(_png(2)), "top_k": True}}, JSON, 400, "InvalidOption", "from 1 to 10"),
    ({"body": {"image": b64(_png(2)), "tta": "often"}}, JSON, 400, "InvalidOption", '"tta" must be one of on, true'),
    ({"body": {"image": b64(_png(2)), "tta": 1}}, JSON, 400, "InvalidOption", '"tta" must be true, false or one of'),
    ({"body": _png(2)}, {"X-TTA": "sometimes"}, 400, "InvalidOption", "on, true, 1, yes, off, false, 0, no, all"),
    ({"body": _png(2)}, {"X-Top-K": "\u00b9"}, 400, "InvalidOption", "from 1 to 10"),  # isdigit() but not int()
    ({"body": _png(2)}, {"X-Top-K": "9" * 5000}, 400, "InvalidOption", "from 1 to 10"),  # over int()'s digit limit
    ({"body": b'{"image": "x", "top_k": ' + b"9" * 5000 + b"}"}, {}, 400, "InvalidJSON", "not valid JSON"),
    ({"body": b"[" * 50000}, {}, 400, "InvalidJSON", "not valid JSON"),  # nesting over the recursion limit
    ({"data": _png(2), "tta": b"maybe"}, {}, 400, "InvalidOption", 'Field "tta"'),
    ({"data": _png(2), "top_k": b"2\x1f"}, {}, 400, "InvalidOption", 'Field "top_k"'),  # strip() removes \x1f, int() not
    ({"junk": b"x"}, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "UnsupportedMediaType", "curl"),
    ({"body": {"instances": []}}, JSON, 400, "InvalidJSON", "non-empty list"),
    ({"body": {"instances": [{"image": b64(_png(2))}] * 65}}, JSON, 400, "InvalidJSON", "the limit is 64"),
    ({"body": {"instances": [{"image": b64(_png(2))}, {"image": b64(b"GIF89a")}]}}, JSON, 400, "InvalidImage", "instances[1]:"),
]


@pytest.mark.parametrize("start", range(0, len(BAD), 6))
def test_every_bad_request_gets_its_named_4xx_and_its_neighbours_their_normal_answer(tiny_handler, start):
    """Batches of 8 as TorchServe sends them: 6 bad requests of different kinds between
    2 good ones; nothing raises, each bad one gets its own error, the good ones their answer."""
    handler, ctx = tiny_handler
    good = [({"body": _png(10)}, {}), ({"body": {"image": b64(_png(11)), "top_k": 2}}, JSON)]
    alone = [run_batch(handler, ctx, [g])[1][0] for g in good]
    bad = BAD[start:start + 6]
    batch = [good[0]] + [(item, headers) for item, headers, *_ in bad] + [good[1]]
    statuses, bodies = run_batch(handler, ctx, batch)
    assert statuses == [200] + [status for _, _, status, _, _ in bad] + [200]
    assert same_answer([bodies[0], bodies[-1]], alone)
    for (_, _, status, kind, fragment), body in zip(bad, bodies[1:-1]):
        assert body["code"] == status and body["type"] == kind, body
        assert fragment in body["message"], body["message"]
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(len(batch)))


def test_a_batch_of_only_bad_requests_is_answered(tiny_handler):
    handler, ctx = tiny_handler
    statuses, bodies = run_batch(handler, ctx, [({"body": b""}, {}), ({"body": b"text"}, {})])
    assert statuses == [400, 415] and [b["type"] for b in bodies] == ["EmptyRequest", "UnsupportedMediaType"]


def test_describe_and_explain_in_a_mixed_batch_leave_every_neighbour_alone(tiny_handler):
    handler, ctx = tiny_handler
    a, b = _png(20), _png(21)
    doc = {"instances": [{"image": b64(a)}, {"image": b64(b), "tta": False}]}
    requests = [({"body": a}, {}), ({"body": b}, {"X-TTA": "off", "X-Top-K": "4"}), ({"body": doc}, JSON)]
    alone = [run_batch(handler, ctx, [r])[1][0] for r in requests]
    explained = run_batch(handler, ctx, [({"body": b}, {"explain": "True"})])[1][0]
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": b"garbage"}, {"describe": "True"}),  # a describe header answers the description, body unread
        requests[0], ({"body": b}, {"explain": "True"}), requests[1], ({"body": b"garbage"}, {}), requests[2],
    ])
    assert statuses == [200, 200, 200, 200, 415, 200]
    assert set(bodies[0]) >= {"model", "classes", "input", "tta", "limits"}
    assert same_answer([bodies[1], bodies[3], bodies[5]], alone)
    assert bodies[2] == explained and len(bodies[2]["views"]) == 4
    assert "views" not in bodies[1] and "views" not in bodies[3]


def test_body_fields_win_over_headers(tiny_handler):
    handler, ctx = tiny_handler
    data = _png(30)
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": {"image": b64(data), "top_k": 2, "tta": True}}, {**JSON, "X-Top-K": "5", "X-TTA": "off"}),
        ({"data": data, "top_k": b"1", "tta": b"off"}, {"X-Top-K": "5", "X-TTA": "on"}),
        ({"body": data}, {"X-Top-K": "5", "X-TTA": "off"}),
    ])
    assert statuses == [200] * 3
    assert [(len(b["top_k"]), b["tta_views"]) for b in bodies] == [(2, 4), (1, 1), (5, 1)]


@pytest.mark.parametrize("encode_image", [
    lambda d: b64(d),
    lambda d: "data:image/png;base64," + b64(d),
    lambda d: base64.urlsafe_b64encode(d).decode().rstrip("="),
    lambda d: "\n".join(b64(d)[i:i + 76] for i in range(0, len(b64(d)), 76)),  # MIME line breaks
])
@pytest.mark.parametrize("as_bytes", [False, True])  # pre-parsed (application/json) or raw bytes
def test_json_image_encodings(tiny_handler, encode_image, as_bytes):
    handler, ctx = tiny_handler
    data = _png(31)
    doc = {"image": encode_image(data)}
    raw = run_batch(handler, ctx, [({"body": data}, {})])[1][0]
    statuses, bodies = run_batch(handler, ctx, [({"body": json.dumps(doc).encode() if as_bytes else doc}, JSON)])
    assert statuses == [200] and bodies[0] == raw


# --- limits -----------------------------------------------------------------------------------

def _handler_with_limits(tiny_model_dir, **limits):
    ctx = make_context(tiny_model_dir, {"handler": {"limits": limits}})
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    return handler, ctx


def _frames(n: int) -> bytes:
    frames = [Image.fromarray(np.full((8, 8), 10 * i, np.uint8)) for i in range(n)]  # all different: none merged
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def test_limits_come_from_model_config_and_are_exact(tiny_model_dir):
    handler, ctx = _handler_with_limits(tiny_model_dir, max_pixels=800, max_frames=3, max_instances=2)
    one = {"image": b64(_png(40))}
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": encode(Image.new("L", (40, 20)), "PNG")}, {}),  # 800 pixels: at the limit
        ({"body": encode(Image.new("L", (41, 20)), "PNG")}, {}),
        ({"body": _frames(3)}, {}),
        ({"body": _frames(4)}, {}),
        ({"body": {"instances": [one, one]}}, JSON),
        ({"body": {"instances": [one, one, one]}}, JSON),
    ])
    assert statuses == [200, 413, 200, 413, 200, 400]
    assert "41x20 = 820 pixels; the limit is 800 pixels" in bodies[1]["message"]
    assert "4 frames; the limit is 3" in bodies[3]["message"]
    assert "3 items; the limit is 2" in bodies[5]["message"]


def test_the_pixel_limit_is_checked_from_the_header_before_any_pixel_is_decoded():
    """The IHDR claims 30000x30000 (900 MP) but the pixel data is garbage: a decoder would
    answer 400 'truncated'; 413 in a few milliseconds shows the header alone decided."""
    start = time.perf_counter()
    slot = prepare({"body": png_claiming(30000, 30000)}, {}, SPEC)
    assert slot.status == 413 and slot.type == "ImageTooLarge"
    slot = prepare({"body": png_claiming(7000, 6000)}, {}, SPEC)
    assert slot.status == 413 and "7000x6000 = 42,000,000 pixels; the limit is 40,000,000" in slot.message
    assert time.perf_counter() - start < 0.5
    small = prepare({"body": png_claiming(100, 100)}, {}, SPEC)  # within the limit: decoded, found corrupt
    assert small.status == 400 and small.type == "InvalidImage"


def test_a_real_decompression_bomb_is_refused_without_inflating_it():
    bomb = png_claiming(8000, 8000, zlib.compress(b"\x00" * (8001 * 8000), 9))  # 64 MP of zeros in ~60 KB
    assert len(bomb) < 100_000
    start = time.perf_counter()
    slot = prepare({"body": bomb}, {}, SPEC)
    assert slot.status == 413 and "8000x8000" in slot.message
    assert time.perf_counter() - start < 0.2


def tiff_pages(n: int) -> bytes:
    """A little-endian TIFF of ``n`` 1x1 gray pages (102-byte IFDs sharing one strip): tiny, quick to build."""
    ifd_size, strip = 2 + 8 * 12 + 4, 8 + n * (2 + 8 * 12 + 4)
    tags = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, strip), (278, 3, 1), (279, 4, 1)]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(n):
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            out += struct.pack("<HHI", tag, kind, 1) + struct.pack("<HH" if kind == 3 else "<I", *((value, 0) if kind == 3 else (value,)))
        out += struct.pack("<I", 8 + (i + 1) * ifd_size if i < n - 1 else 0)
    return bytes(out + b"\x80")


def test_a_tiff_with_tens_of_thousands_of_pages_is_refused_at_once():
    """Pillow's n_frames walks TIFF pages in quadratic time (16,000 pages: ~8 s, 80,000 in a
    10 MB body: minutes, past the worker's responseTimeout); counting stops after the limit."""
    spec = fashion_spec(limits={"max_frames": 100})
    assert isinstance(prepare({"body": tiff_pages(100)}, {}, spec), Prepared)
    over = prepare({"body": tiff_pages(101)}, {}, spec)
    assert over.status == 413 and "more than 100 frames; the limit is 100" in over.message
    many = tiff_pages(60_000)
    start = time.perf_counter()
    slot = prepare({"body": many}, {}, spec)
    assert slot.status == 413 and time.perf_counter() - start < 1.0


def test_a_configured_pixel_limit_above_pillows_warning_threshold_is_honoured(tiny_model_dir):
    """Pillow warns at ~89 MP; a configured limit of 100 MP must let a 95 MP header through
    to the decoder (this one is garbage, so 400), and refuse 101 MP with the configured number."""
    handler, ctx = _handler_with_limits(tiny_model_dir, max_pixels=100_000_000)
    statuses, bodies = run_batch(handler, ctx, [({"body": png_claiming(9500, 10000)}, {}),
                                                ({"body": png_claiming(10100, 10000)}, {})])
    assert statuses == [400, 413], bodies
    assert "the limit is 100,000,000 pixels" in bodies[1]["message"]
