"""Fuzz the request-to-tensor path: whatever bytes or JSON a client sends, the handler's
preprocessing answers with a tensor (a 200) or a named 4xx RequestError, and never raises.

Seeds are small valid images in every accepted format (plus animated and 16-bit
ones); hypothesis flips, overwrites, inserts and truncates their bytes, splices
them together, or sends random bytes and random JSON.  Limits are lowered so
that a mutated header claiming a huge size is refused (413) instead of making
the test allocate hundreds of megabytes.
"""

from __future__ import annotations

import base64
import io
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from handler.errors import RequestError
from handler.preprocess import Prepared, bytes_to_tensor, prepare
from scripts.train.data import fashion_spec

SPEC = fashion_spec(limits={"max_pixels": 1_000_000, "max_frames": 8, "max_instances": 4})
STATUSES = {400, 413, 415}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,  # nothing written into the shared checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)) for _ in range(3)]
    return {
        "png": _encode(gray, "PNG"),
        "png16": _encode(Image.fromarray(rng.integers(0, 65536, (7, 5), dtype=np.uint16)), "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG", transparency=3),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": _encode(rgb, "WEBP", lossless=True),
        "webp_anim": _encode(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90)]),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(gray, "TIFF"),
        "tiff_float": _encode(Image.fromarray(rng.random((5, 4), dtype=np.float32)), "TIFF"),
        "tiff_deflate": _encode(rgb, "TIFF", compression="tiff_deflate"),
    }


SEEDS = _seeds()


def _check(result) -> None:
    """A prepared request (its tensors finite and model-shaped) or a named 4xx error."""
    if isinstance(result, RequestError):
        assert result.status in STATUSES, result
        assert type(result).__name__ != "RequestError" and result.message
        body = result.to_body()
        assert body["code"] == result.status and body["type"] == type(result).__name__
        return
    assert isinstance(result, Prepared), result
    for tensor in result.tensors:
        assert tuple(tensor.shape) == (1, 28, 28) and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "splice")))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255)))))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            start = draw(st.integers(0, len(other) - 1))
            data[pos:] = other[start:start + draw(st.integers(1, 64))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(autouse=True)
def _quiet_decoder_warnings():
    with warnings.catch_warnings():  # Pillow warns about corrupt EXIF/TIFF tags while reading them
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_seeds_are_valid_images():
    for name, data in SEEDS.items():
        assert isinstance(prepare({"body": data}, {}, SPEC), Prepared), name


@FUZZ
@given(data=mutated())
def test_mutated_images_get_a_tensor_or_a_named_4xx(data):
    _check(prepare({"body": data}, {}, SPEC))


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), st.builds(lambda head, tail: head + tail,
       st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                        b"BM", b"II*\x00", b"MM\x00*", b"%PDF-", b"<svg", b"{", b"["]), st.binary(max_size=256))))
def test_random_bytes_get_a_named_4xx(data):
    result = prepare({"body": data}, {}, SPEC)
    _check(result)


@FUZZ
@given(data=mutated())
def test_bytes_to_tensor_raises_only_request_errors(data):
    try:
        tensor = bytes_to_tensor(data, SPEC)
    except RequestError as exc:
        assert exc.status in STATUSES and type(exc) is not RequestError
    else:
        assert tuple(tensor.shape) == (1, 28, 28) and torch.isfinite(tensor).all()


# Option values: free text, and digit-like text (Unicode digits, superscripts, signs, huge numbers).
_option_text = st.one_of(st.text(max_size=8), st.text(alphabet="0123456789+- .eE\u00b9\u00b2\u0663\u2081\uff13", max_size=8),
                         st.integers(-10, 10**30).map(str), st.sampled_from(["on", "OFF", " yes ", "true", "1", "0"]))
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                          st.text(max_size=20), _option_text)
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
_image_values = st.one_of(
    _json_values,
    mutated().map(lambda b: base64.b64encode(b).decode()),
    mutated().map(lambda b: "data:image/png;base64," + base64.urlsafe_b64encode(b).decode().rstrip("=")),
)
_options = st.fixed_dictionaries({}, optional={"top_k": _json_values, "tta": _json_values})


@st.composite
def json_documents(draw):
    one = st.builds(lambda image, opts: {"image": image, **opts}, _image_values, _options)
    kind = draw(st.sampled_from(("one", "instances", "any")))
    if kind == "one":
        return draw(one)
    if kind == "instances":
        return {"instances": draw(st.one_of(st.lists(st.one_of(one, _json_values), max_size=6), _json_values))}
    return draw(_json_values)


@FUZZ
@given(doc=json_documents(), as_bytes=st.booleans(),
       headers=st.fixed_dictionaries({}, optional={"x-top-k": _option_text, "x-tta": _option_text,
                                                   "content-type": st.sampled_from(["application/json", "text/plain"])}))
def test_json_requests_and_options_get_an_answer_or_a_named_4xx(doc, as_bytes, headers):
    import json

    item = {"body": json.dumps(doc).encode() if as_bytes else doc}
    _check(prepare(item, headers, SPEC))


_field_names = st.one_of(st.sampled_from(["data", "file", "image", "body", "top_k", "tta", "explain_class"]), st.text(max_size=6))
_field_values = st.one_of(mutated(), st.binary(max_size=32), _option_text.map(str.encode), st.none())


@FUZZ
@given(item=st.dictionaries(_field_names, _field_values, max_size=4),
       headers=st.dictionaries(st.sampled_from(["x-top-k", "x-tta", "x-explain-class", "content-type", "explain", "describe"]),
                               _option_text, max_size=3))
def test_multipart_fields_and_headers_get_an_answer_or_a_named_4xx(item, headers):
    result = prepare(item, headers, SPEC)
    if result != "describe":
        _check(result)
