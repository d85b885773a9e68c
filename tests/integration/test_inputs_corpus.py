"""The input corpus over the real HTTP API (TorchServe started from the shipped config).

Every valid image, whatever its format, mode, geometry or encoding, gets 200 and the
answer its pixels deserve; every invalid request gets a JSON 4xx naming the problem.
The corpus is generated here with Pillow/numpy; the limits are read from the shipped
handler/model-config.yaml and config.properties, so the test follows the configuration.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
import yaml
from PIL import Image, ImageOps

from scripts.deploy.harness import EXAMPLE, REPO
from tests.conftest import SHIPPED_VIEWS, same_answer
from tests.unit.test_inputs import png_claiming, tiff_pages

MODEL = "fashion_cnn"
BOOT = Image.open(EXAMPLE).convert("L")  # 28x28 Fashion-MNIST ankle boot: white garment on black
GRAY = np.asarray(BOOT)
LIMITS = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())["handler"]["limits"]
ACCEPTED = "Accepted formats: JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF or AVIF"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def example(name: str) -> bytes:
    return (EXAMPLE.parent / f"{name}.png").read_bytes()


def zlib_bomb(width: int, height: int) -> bytes:
    """A real PNG of zeros: megabytes of pixels in kilobytes of file."""
    return png_claiming(width, height, zlib.compress(b"\x00" * ((width + 1) * height), 9))


def gif_frames(n: int) -> bytes:
    frames = [Image.fromarray(np.full((8, 8), i % 251, np.uint8)) for i in range(n)]  # all differ: none merged
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def rgb(img: Image.Image = BOOT) -> Image.Image:
    return img.convert("RGB")


def white_with_alpha() -> Image.Image:
    """White everywhere, opacity = the boot's brightness: composited on black it is the boot again."""
    rgba = np.zeros((*GRAY.shape, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = GRAY
    return Image.fromarray(rgba, "RGBA")


def palette_with_transparent_red() -> Image.Image:
    img = BOOT.convert("P")  # gray palette: index == value
    palette = img.getpalette()
    palette[:3] = [255, 0, 0]  # the background index is red and transparent
    img.putpalette(palette)
    img.info["transparency"] = 0
    return img


def exif_jpeg(orientation: int = 6, tagged: bool = True) -> bytes:
    """The boot, 8x upscaled, stored rotated 90 degrees as a camera held sideways would."""
    sideways = rgb(BOOT.resize((224, 224), Image.BICUBIC)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(sideways, "JPEG", quality=95, **({"exif": exif.tobytes()} if tagged else {}))


def upright_png_of(jpeg: bytes) -> bytes:
    """The same decoded pixels turned upright by hand, stored losslessly."""
    return encode(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))), "PNG")


# --- HTTP -----------------------------------------------------------------------------------

def post(client, body: bytes | None = None, *, content_type: str | None = None, headers: dict | None = None,
         files: dict | None = None, form: dict | None = None, route: str = "predictions") -> requests.Response:
    """POST exactly what a client would send: no Content-Type unless given (requests adds none for bytes)."""
    hdrs = {"Authorization": f"Bearer {client.key('inference')}", **(headers or {})}
    if content_type:
        hdrs["Content-Type"] = content_type
    url = f"{client.endpoints.inference}/{route}/{MODEL}"
    return requests.post(url, data=form if files else body, files=files, headers=hdrs, timeout=60)


ANSWER_KEYS = {"label", "class_index", "confidence", "uncertain", "out_of_distribution", "ood_score", "top_k", "tta_views"}


@dataclass
class Case:
    name: str
    request: Callable[[], dict]  # keyword arguments for post()
    status: int
    kind: str | None = None  # the error "type"
    says: list[str] = field(default_factory=list)  # fragments of the error message
    check: Callable | None = None  # check(body, known) for a 200


# 200 checks: `known` holds the answers of the untouched examples (PNG, raw body).
def same_as_boot(body, known):
    assert same_answer(body, known["ankle_boot"]), (body, known["ankle_boot"])


def boot_label(body, known):
    assert body["label"] == "Ankle boot" and abs(body["confidence"] - known["ankle_boot"]["confidence"]) < 0.05, body


def an_answer(body, known):
    assert set(body) == ANSWER_KEYS and body["label"] in known["classes"] and 0 <= body["confidence"] <= 1


def options(top_k: int, views: int, label: str = "Ankle boot"):
    def check(body, known):
        assert len(body["top_k"]) == top_k and body["tta_views"] == views and body["label"] == label, body
    return check


def raw(data: Callable[[], bytes], content_type: str | None = None, headers: dict | None = None):
    return lambda: {"body": data(), "content_type": content_type, "headers": headers}


def as_json(doc: Callable[[], object], content_type: str = "application/json"):
    return lambda: {"body": json.dumps(doc()).encode(), "content_type": content_type}


def boot_png() -> bytes:
    return EXAMPLE.read_bytes()


VALID = [
    # encodings of the untouched PNG
    Case("raw_png_without_content_type", raw(boot_png), 200, check=same_as_boot),
    Case("raw_png_octet_stream", raw(boot_png, "application/octet-stream"), 200, check=same_as_boot),
    Case("raw_png_labelled_image_jpeg", raw(boot_png, "image/jpeg"), 200, check=same_as_boot),
    Case("raw_png_labelled_text_plain", raw(boot_png, "text/plain"), 200, check=same_as_boot),
    Case("raw_png_labelled_application_json", raw(boot_png, "application/json"), 200, check=same_as_boot),
    Case("multipart_field_data", lambda: {"files": {"data": ("boot.png", boot_png(), "image/png")}}, 200, check=same_as_boot),
    Case("multipart_field_file", lambda: {"files": {"file": ("boot.png", boot_png(), "image/png")}}, 200, check=same_as_boot),
    Case("multipart_field_image", lambda: {"files": {"image": ("boot.png", boot_png(), "application/octet-stream")}}, 200, check=same_as_boot),
    Case("multipart_with_option_fields", lambda: {"files": {"data": ("b.png", boot_png())}, "form": {"top_k": "5", "tta": "off"}},
         200, check=options(5, 1)),
    Case("json_base64", as_json(lambda: {"image": b64(boot_png())}), 200, check=same_as_boot),
    Case("json_data_url_with_options", as_json(lambda: {"image": "data:image/png;base64," + b64(boot_png()), "top_k": 4, "tta": False}),
         200, check=options(4, 1)),
    Case("json_urlsafe_base64_charset", as_json(lambda: {"image": base64.urlsafe_b64encode(boot_png()).decode().rstrip("=")},
                                                "application/json; charset=utf-8"), 200, check=same_as_boot),
    Case("json_fields_win_over_headers", lambda: {**as_json(lambda: {"image": b64(boot_png()), "top_k": 2})(),
                                                  "headers": {"X-Top-K": "6", "X-TTA": "off"}}, 200, check=options(2, 1)),
    Case("headers_set_options", raw(boot_png, headers={"X-Top-K": "10", "x-tta": "No"}), 200, check=options(10, 1)),
    # formats and modes: lossless ones must give exactly the PNG's answer
    Case("png_rgb", raw(lambda: encode(rgb(), "PNG")), 200, check=same_as_boot),
    Case("png_16bit_grayscale", raw(lambda: encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG")), 200, check=same_as_boot),
    Case("png_rgba_alpha_composited_on_black", raw(lambda: encode(white_with_alpha(), "PNG")), 200, check=same_as_boot),
    Case("png_la_alpha_composited_on_black", raw(lambda: encode(white_with_alpha().convert("LA"), "PNG")), 200, check=same_as_boot),
    Case("png_palette_transparent_background", raw(lambda: encode(palette_with_transparent_red(), "PNG")), 200, check=same_as_boot),
    Case("png_1bit", raw(lambda: encode(BOOT.convert("1"), "PNG")), 200, check=an_answer),
    Case("gif_animated_first_frame_counts", raw(lambda: encode(BOOT, "GIF", save_all=True, append_images=[
        Image.open(io.BytesIO(example("trouser"))), Image.open(io.BytesIO(example("bag")))])), 200, check=same_as_boot),
    Case("gif_animated_trouser_first", raw(lambda: encode(Image.open(io.BytesIO(example("trouser"))), "GIF", save_all=True,
                                                          append_images=[BOOT]), headers={"X-TTA": "all"}), 200,
         check=options(3, SHIPPED_VIEWS, "Trouser")),  # X-TTA: all: every view of the shipped policy, past the gate
    Case("gif_at_the_frame_limit", raw(lambda: gif_frames(LIMITS["max_frames"])), 200, check=an_answer),
    Case("webp_lossless", raw(lambda: encode(rgb(), "WEBP", lossless=True), "image/webp"), 200, check=same_as_boot),
    Case("webp_lossy", raw(lambda: encode(rgb(), "WEBP", quality=90)), 200, check=boot_label),
    Case("bmp", raw(lambda: encode(rgb(), "BMP")), 200, check=same_as_boot),
    Case("tiff", raw(lambda: encode(BOOT, "TIFF")), 200, check=same_as_boot),
    Case("tiff_16bit", raw(lambda: encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "TIFF")), 200, check=same_as_boot),
    Case("tiff_float_0_to_1", raw(lambda: encode(Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF")), 200, check=same_as_boot),
    Case("jpeg_baseline", raw(lambda: encode(rgb(), "JPEG", quality=90), "image/jpeg"), 200, check=boot_label),
    Case("jpeg_progressive", raw(lambda: encode(rgb(), "JPEG", quality=90, progressive=True)), 200, check=boot_label),
    Case("jpeg_cmyk", raw(lambda: encode(rgb().convert("CMYK"), "JPEG", quality=90)), 200, check=boot_label),
    # HEIC (pillow-heif's x265 encoder) and AVIF (Pillow's), as phones and browsers make them
    Case("heic", raw(lambda: encode(rgb(BOOT.resize((224, 224), Image.BICUBIC)), "HEIF", quality=90), "image/heic"),
         200, check=boot_label),
    Case("avif", raw(lambda: encode(rgb(BOOT.resize((224, 224), Image.BICUBIC)), "AVIF", quality=90), "image/avif"),
         200, check=boot_label),
    # geometry
    Case("1x1", raw(lambda: encode(Image.new("L", (1, 1), 255), "PNG")), 200, check=an_answer),
    Case("2000x3", raw(lambda: encode(Image.new("RGB", (2000, 3), (200, 200, 200)), "PNG")), 200, check=an_answer),
    Case("3x2000", raw(lambda: encode(Image.new("L", (3, 2000), 255), "PNG")), 200, check=an_answer),
    Case("boot_upscaled_10x", raw(lambda: encode(BOOT.resize((280, 280), Image.BICUBIC), "PNG")), 200, check=boot_label),
    Case("exactly_the_pixel_limit", raw(lambda: encode(Image.new("L", (10_000, LIMITS["max_pixels"] // 10_000)), "PNG",
                                                       compress_level=1)), 200, check=an_answer),
]

INVALID = [
    Case("empty_body", raw(lambda: b"", "application/octet-stream"), 400, "EmptyRequest", ["has no image"]),
    Case("empty_body_without_content_type", raw(lambda: b""), 400, "EmptyRequest", ["has no image"]),
    Case("text", raw(lambda: b"a cat, sitting on a mat\n", "text/plain"), 415, "UnsupportedMediaType", ["plain text", ACCEPTED]),
    Case("random_bytes", raw(lambda: np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()), 415,
         "UnsupportedMediaType", ["unrecognised binary data", ACCEPTED]),
    Case("pdf", raw(lambda: b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", "application/pdf"), 415,
         "UnsupportedMediaType", ["PDF", ACCEPTED]),
    Case("svg", raw(lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><rect width="9" height="9"/></svg>',
                    "image/svg+xml"), 415, "UnsupportedMediaType", ["SVG", "rasterise", ACCEPTED]),
    Case("html", raw(lambda: b"<!DOCTYPE html><html><body>hi</body></html>"), 415, "UnsupportedMediaType", ["HTML", ACCEPTED]),
    Case("jpeg2000_not_accepted", raw(lambda: encode(rgb(), "JPEG2000")), 415, "UnsupportedMediaType", [ACCEPTED]),
    Case("ico_not_accepted", raw(lambda: encode(rgb(), "ICO")), 415, "UnsupportedMediaType", [ACCEPTED]),
    Case("png_cut_in_the_header", raw(lambda: boot_png()[:16]), 400, "InvalidImage", ["starts like a PNG file", "truncated"]),
    Case("png_truncated", raw(lambda: boot_png()[: len(boot_png()) // 2]), 400, "InvalidImage", ["PNG", "truncated"]),
    Case("png_corrupt_pixel_data", raw(lambda: png_claiming(28, 28, b"\x78\x9c" + bytes(range(200)))), 400, "InvalidImage",
         ["PNG", "corrupt"]),
    Case("jpeg_truncated", raw(lambda: encode(rgb(BOOT.resize((200, 200))), "JPEG")[:900]), 400, "InvalidImage", ["JPEG", "truncated"]),
    Case("heic_truncated", raw(lambda: (lambda d: d[: len(d) // 2])(encode(rgb(BOOT.resize((200, 200))), "HEIF"))),
         400, "InvalidImage", ["HEIC", "truncated"]),
    Case("avif_truncated", raw(lambda: (lambda d: d[: len(d) // 2])(encode(rgb(BOOT.resize((200, 200))), "AVIF"))),
         400, "InvalidImage", ["AVIF", "truncated"]),
    Case("jpeg_corrupt", raw(lambda: (lambda j: j[:2] + b"\xff\xff" * 40 + j[82:])(encode(rgb(), "JPEG"))), 400, "InvalidImage",
         ["JPEG", "corrupt"]),
    Case("decompression_bomb_header_30000x30000", raw(lambda: png_claiming(30_000, 30_000)), 413, "ImageTooLarge",
         ["900,000,000 pixels", f"the limit is {LIMITS['max_pixels']:,} pixels"]),
    Case("zlib_bomb_just_over_the_pixel_limit", raw(lambda: zlib_bomb(10_000, LIMITS["max_pixels"] // 10_000 + 1)), 413,
         "ImageTooLarge", [f"10000x{LIMITS['max_pixels'] // 10_000 + 1}", f"the limit is {LIMITS['max_pixels']:,} pixels"]),
    Case("tiff_with_80000_pages", raw(lambda: tiff_pages(80_000)), 413, "ImageTooLarge",
         [f"more than {LIMITS['max_frames']} frames"]),
    Case("gif_over_the_frame_limit", raw(lambda: gif_frames(LIMITS["max_frames"] + 1)), 413, "ImageTooLarge",
         [f"{LIMITS['max_frames'] + 1} frames; the limit is {LIMITS['max_frames']}"]),
    Case("json_malformed", lambda: {"body": b'{"image": "abc",', "content_type": "application/json"}, 400, "InvalidJSON",
         ["not valid JSON"]),
    Case("json_array", as_json(lambda: [b64(boot_png())]), 400, "InvalidJSON", ["must be an object; got list"]),
    Case("json_string", as_json(lambda: b64(boot_png())), 400, "InvalidJSON", ["must be an object; got a string"]),
    Case("json_null", as_json(lambda: None), 400, "InvalidJSON", ["must be an object; got null"]),
    Case("json_number", as_json(lambda: 7), 400, "InvalidJSON", ["must be an object; got int"]),
    Case("json_without_image", as_json(lambda: {"img": b64(boot_png())}), 400, "InvalidJSON", ['no "image" field', "'img'"]),
    Case("json_image_not_a_string", as_json(lambda: {"image": [1, 2, 3]}), 400, "InvalidJSON", ["must be a base64 string"]),
    Case("json_bad_base64", as_json(lambda: {"image": "this is *not* base64!"}), 400, "InvalidBase64", ["not valid base64"]),
    Case("json_empty_image", as_json(lambda: {"image": ""}), 400, "EmptyRequest", ['"image" is empty']),
    Case("json_base64_of_text", as_json(lambda: {"image": b64(b"hello, I am not an image")}), 400, "InvalidImage",
         ["valid base64, but", "plain text", ACCEPTED]),
    Case("json_base64_of_truncated_png", as_json(lambda: {"image": b64(boot_png()[:300])}), 400, "InvalidImage", ["truncated"]),
    Case("json_instances_empty", as_json(lambda: {"instances": []}), 400, "InvalidJSON", ["non-empty list"]),
    Case("json_instances_over_the_limit", as_json(lambda: {"instances": [{"image": b64(boot_png())}] * (LIMITS["max_instances"] + 1)}),
         400, "InvalidJSON", [f"the limit is {LIMITS['max_instances']}"]),
    Case("json_instances_one_bad", as_json(lambda: {"instances": [{"image": b64(boot_png())}, {"image": b64(b"%PDF-1.4")}]}),
         400, "InvalidImage", ["instances[1]:", "PDF"]),
    Case("top_k_zero", as_json(lambda: {"image": b64(boot_png()), "top_k": 0}), 400, "InvalidOption", ["integer from 1 to 10; got 0"]),
    Case("top_k_fractional", as_json(lambda: {"image": b64(boot_png()), "top_k": 2.5}), 400, "InvalidOption", ["from 1 to 10; got 2.5"]),
    Case("top_k_header_too_big", raw(boot_png, headers={"X-Top-K": "11"}), 400, "InvalidOption", ["X-Top-K must be an integer from 1 to 10"]),
    Case("top_k_header_superscript", raw(boot_png, headers={"X-Top-K": "\u00b2"}), 400, "InvalidOption",
         ["X-Top-K"]),
    Case("top_k_field_not_a_number", lambda: {"files": {"data": ("b.png", boot_png())}, "form": {"top_k": "three"}}, 400,
         "InvalidOption", ['Field "top_k"', "from 1 to 10"]),
    Case("tta_not_a_mode", as_json(lambda: {"image": b64(boot_png()), "tta": "sometimes"}), 400, "InvalidOption",
         ['"tta" must be one of on, true, 1, yes, off, false, 0, no, all', '"sometimes"']),
    Case("tta_not_a_boolean", as_json(lambda: {"image": b64(boot_png()), "tta": 1}), 400, "InvalidOption",
         ['"tta" must be true, false or one of "off", "on", "all"']),
    Case("tta_header_unknown", raw(boot_png, headers={"X-TTA": "sometimes"}), 400, "InvalidOption",
         ["X-TTA must be one of on, true, 1, yes, off, false, 0, no", '"sometimes"']),
    # curl -d @file.png: the frontend splits the body into form fields (see docs/inputs.md for bodies it cannot split)
    Case("form_urlencoded_body", raw(lambda: boot_png()[:8], "application/x-www-form-urlencoded"), 415, "UnsupportedMediaType",
         ["x-www-form-urlencoded", "Content-Type: application/octet-stream"]),
]


@pytest.fixture(scope="module")
def known(client):
    """What untouched examples get, and the workers, before the corpus runs."""
    answers = {name: post(client, example(name)).json() for name in ("ankle_boot", "trouser", "bag")}
    assert answers["ankle_boot"]["label"] == "Ankle boot" and answers["trouser"]["label"] == "Trouser"
    description = post(client, b"", headers={"describe": "true"}).json()
    return {**answers, "classes": description["classes"],
            "workers": {(w["id"], w["pid"]) for w in client.describe(MODEL)[0]["workers"]}}


def test_the_corpus_is_big_enough():
    assert len(VALID) + len(INVALID) >= 40 and len({c.name for c in VALID + INVALID}) == len(VALID + INVALID)


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_valid_input_gets_200_and_the_answer_its_pixels_deserve(client, known, case):
    resp = post(client, **case.request())
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == ANSWER_KEYS, body
    case.check(body, known)


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_invalid_request_gets_its_named_json_4xx(client, known, case):
    start = time.monotonic()
    resp = post(client, **case.request())
    assert resp.status_code == case.status, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == case.status and body["type"] == case.kind, body
    for fragment in case.says:
        assert fragment in body["message"], body["message"]
    assert time.monotonic() - start < 10  # refused, not worked on


def test_an_exif_rotated_photo_gets_the_answer_of_the_upright_one(client):
    tagged = exif_jpeg(6)
    upright = post(client, upright_png_of(tagged)).json()
    got = post(client, tagged, content_type="image/jpeg").json()
    assert same_answer(got, upright), (got, upright)
    assert got["label"] == "Ankle boot"
    ignored = post(client, exif_jpeg(6, tagged=False)).json()  # the same pixels without the tag: lying on its side
    assert not same_answer(ignored, upright, tol=1e-3)


def test_instances_are_answered_with_a_list_in_order(client, known):
    names = ["bag", "ankle_boot", "trouser"]
    doc = {"instances": [{"image": b64(example(n))} for n in names]}
    resp = post(client, json.dumps(doc).encode(), content_type="application/json")
    assert resp.status_code == 200
    assert same_answer(resp.json(), [known[n] for n in names])


def test_explanations_add_the_per_view_breakdown(client, known):
    resp = post(client, EXAMPLE.read_bytes(), route="explanations")
    assert resp.status_code == 200
    body = resp.json()
    views = body.pop("views")
    ood = body.pop("ood")
    assert body.pop("explanation")["method"] == "grad-cam-x-gradient"  # its images: tests/integration/test_serving.py
    assert same_answer(body, known["ankle_boot"])
    # the views this image got: a confident image passes the TTA gate with the identity view alone
    assert [v["view"] for v in views] == ["identity"] and views[0]["label"] == "Ankle boot"
    assert ood["method"] == "features" and ood["threshold"] > body["ood_score"] and "mahalanobis_block3" in ood["parts"]


def test_a_body_over_max_request_size_is_refused_by_the_frontend_with_413(server, client):
    limit = int(server.properties()["max_request_size"])
    png = EXAMPLE.read_bytes()
    at_limit = post(client, png + b"\x00" * (limit - len(png)))  # trailing bytes after IEND are ignored
    assert at_limit.status_code == 200 and at_limit.json()["label"] == "Ankle boot"
    over = post(client, png + b"\x00" * (limit + 1 - len(png)))
    assert over.status_code == 413  # answered by the Java frontend, before any worker: no JSON body


def test_afterwards_the_known_image_still_gets_its_usual_answer_from_the_same_workers(client, known):
    assert same_answer(post(client, EXAMPLE.read_bytes()).json(), known["ankle_boot"])
    workers = client.describe(MODEL)[0]["workers"]
    assert {(w["id"], w["pid"]) for w in workers} == known["workers"]
    assert all(w["status"] == "READY" for w in workers)
