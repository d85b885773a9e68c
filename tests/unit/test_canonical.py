"""Canonicalisation: idempotent, a no-op on native images, robust to how photos are taken,
and the same function in training and in the handler."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.canonical import SIGNALS, CanonicalSpec, canonicalise
from handler.errors import SpecError
from handler.preprocess import Prepared, canonical_image, prepare
from scripts.train.data import eval_inputs, fashion_spec, load_idx_dir
from scripts.train.photos import STYLES, render_all
from tests.conftest import DATA

SPEC = fashion_spec()
PARAMS = SPEC.canonical
NATIVE = load_idx_dir(DATA).images[:300]


def canon(img: Image.Image) -> Image.Image:
    return canonicalise(img, PARAMS, (28, 28), "L", (0,)).image


def jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_native_images_are_left_exactly_as_they_are():
    for garment in NATIVE:
        result = canonicalise(Image.fromarray(garment), PARAMS, (28, 28), "L", (0,))
        assert result.passthrough and np.array_equal(np.asarray(result.image), garment)


@pytest.mark.parametrize("style", STYLES)
def test_canonicalisation_is_idempotent_on_photos(style):
    for photo in render_all(NATIVE[:60], style, seed=3):
        once = canon(photo)
        twice = canon(once)
        assert once.size == (28, 28) and once.mode == "L"
        assert np.array_equal(np.asarray(once), np.asarray(twice))


@pytest.mark.parametrize("style", STYLES)
def test_a_photo_comes_back_close_to_the_native_garment(style):
    """Mean absolute difference to the native image, in grey levels; a 1-pixel misplacement of a
    garment costs ~15, a wrong polarity or scale ~60-100.  A drop shadow as dark as studio_shadow's
    (25-50 % of the backdrop) is part of the object's box, so that style keeps a larger residual:
    training sees it (scripts/train/train.py renders every style)."""
    bound = 35 if style == "studio_shadow" else 25
    errors = [np.abs(np.asarray(canon(p), dtype=float) - g).mean() for p, g in zip(render_all(NATIVE[:60], style, 1), NATIVE[:60])]
    assert np.median(errors) < bound, f"{style}: median error {np.median(errors):.1f}"


def test_the_object_anywhere_in_the_frame_and_either_polarity_gives_the_same_input():
    garment = Image.fromarray(NATIVE[0]).resize((140, 140), Image.BICUBIC)
    results = []
    for left, top in ((0, 0), (260, 10), (37, 251), (300, 251)):
        frame = Image.new("L", (440, 391), 0)
        frame.paste(garment, (left, top))
        results.append(np.asarray(canon(frame)))
        inverted = Image.fromarray(255 - np.asarray(frame))
        results.append(np.asarray(canon(inverted)))
    for other in results[1:]:
        assert np.abs(other.astype(int) - results[0]).max() <= 1


def test_tinted_noisy_background_and_jpeg_do_not_move_the_crop():
    rng = np.random.default_rng(0)
    clean = Image.new("RGB", (300, 260), (236, 226, 208))
    clean.paste(Image.fromarray(255 - np.asarray(Image.fromarray(NATIVE[5]).resize((168, 168), Image.BICUBIC))).convert("RGB"),
                (90, 50))
    noisy = np.clip(np.asarray(clean, dtype=float) + rng.normal(0, 6, (260, 300, 3)), 0, 255).astype(np.uint8)
    decoded = Image.open(io.BytesIO(jpeg(Image.fromarray(noisy), 75)))
    a, b = np.asarray(canon(clean), dtype=float), np.asarray(canon(decoded), dtype=float)
    assert np.abs(a - b).mean() < 12


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (1, 500), (3, 2000), (28, 28), (640, 480)])
@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_and_flat_images_become_an_empty_canvas_without_error(size, value):
    result = canonicalise(Image.new("L", size, value), PARAMS, (28, 28), "L", (0,))
    assert result.image.size == (28, 28)
    signals = dict(zip(SIGNALS, result.signals))
    if not result.passthrough:
        assert np.asarray(result.image).max() == 0 and signals["box_area"] == 0.0


def test_a_tiny_object_in_a_huge_frame_is_found():
    frame = Image.new("L", (3000, 2000), 250)
    frame.paste(Image.fromarray(255 - NATIVE[1]), (2500, 1700))
    out = np.asarray(canon(frame))
    assert out.max() == 255 and (out > 30).sum() > 100  # the garment fills the canvas


def test_signals_describe_the_raw_image():
    clean = canonicalise(Image.fromarray(NATIVE[0]), PARAMS, (28, 28), "L", (0,))
    noise = canonicalise(Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)),
                         PARAMS, (28, 28), "L", (0,))
    c, n = dict(zip(SIGNALS, clean.signals)), dict(zip(SIGNALS, noise.signals))
    assert c["border_uniformity"] > 0.9 > n["border_uniformity"]
    assert n["border_noise"] > c["border_noise"]


def test_the_handler_tensor_for_a_photo_equals_trainings():
    photos = render_all(NATIVE[:8], "catalogue_tinted", seed=0)
    trained, signals = eval_inputs(photos, SPEC)
    for i, photo in enumerate(photos):
        data = io.BytesIO()
        photo.save(data, format="PNG")
        slot = prepare({"body": data.getvalue()}, {}, SPEC)
        assert isinstance(slot, Prepared)
        assert torch.equal(slot.tensors[0], trained[i]) and torch.equal(slot.signals[0], signals[i])


def test_a_spec_without_canonicalisation_resizes_as_before():
    spec = fashion_spec(canonical=None)
    wide = Image.new("L", (56, 28), 255)
    assert canonical_image(wide, spec).signals == () and canonical_image(wide, spec).image.size == (28, 28)


@pytest.mark.parametrize("settings, message", [
    ({"tolerance": 0}, "canonical.tolerance is out of range"),
    ({"border": 0.5}, "canonical.border is out of range"),
    ({"analysis_size": 8}, "canonical.analysis_size is out of range"),
    ({"blur": 2}, "unknown setting(s) ['blur']"),
])
def test_invalid_canonical_settings_are_refused(settings, message):
    with pytest.raises(SpecError) as info:
        SPEC.with_overrides({"canonical": settings})
    assert message in str(info.value)


def test_canonical_settings_survive_the_spec_round_trip():
    spec = SPEC.with_overrides({"canonical": {"tolerance": 0.08}})
    assert spec.canonical == CanonicalSpec(tolerance=0.08)
    assert type(spec).from_json(spec.to_json()) == spec
