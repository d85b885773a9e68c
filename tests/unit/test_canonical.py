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
    # A clean backdrop is uniform; the noise's border is all "background" against its own (huge) spread, and the
    # spread is what tells it apart: its noise level is a large share of full intensity.
    assert c["border_uniformity"] > 0.9 and c["border_noise"] < 0.02
    assert n["border_noise"] > 0.1 > c["border_noise"]


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


# --- finding the garment in the photos people take (handler/segment.py) --------------------------------

def _iou(a, b) -> float:
    left, top, right, bottom = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _found_boxes(kind: str, n: int, seed: int, size=(1200, 900)) -> list[float]:
    """IoU of the region canonicalisation chose with the rendered garment's box, for n scenes of a kind."""
    from handler.preprocess import bytes_to_canonical
    from scripts.train.scenes import render_scenes

    ious = []
    for scene in render_scenes(NATIVE[:n], kind, seed, "eval", size=size):
        region = bytes_to_canonical(scene.data, SPEC).region
        w, h = scene.size
        ious.append(0.0 if region is None else _iou((region[0] * w, region[1] * h, region[2] * w, region[3] * h),
                                                    scene.garment_box))
    return ious


@pytest.mark.parametrize("kind, typical, found", [
    ("flat_lay", 0.8, 13),  # wood, fabric, bed sheets, uneven light, rotation, perspective
    ("clutter", 0.9, 15),  # a price tag, a watermark or a small second object near an edge: left out
    ("hanger", 0.75, 13),  # the hook above the garment: thin, opened away
    ("plain", 0.9, 16),  # a light gradient and vignetting: part of the background
    ("edge", 0.85, 15),  # the garment crosses the frame: the border's background fit trims it
])
def test_the_region_found_is_the_garment(kind, typical, found):
    """Over 16 scenes of a kind (eval regime): the median overlap (IoU) of the region chosen with the rendered
    garment's box, and how many scenes overlap it by at least half."""
    ious = np.asarray(_found_boxes(kind, 16, seed=31))
    assert np.median(ious) >= typical and (ious >= 0.5).sum() >= found, (kind, np.round(ious, 2))


def test_a_garment_on_a_textured_surface_does_not_take_the_texture_with_it():
    """On wood, a fabric or a sheet the canonical image is the garment on black, as Fashion-MNIST's are: the
    texture around it is weighted out, so faint grey (9-47) covers about as little of it as of a native image."""
    from handler.preprocess import bytes_to_canonical
    from scripts.train.scenes import render_scenes

    native = np.median([((g > 8) & (g < 48)).mean() for g in NATIVE[:200]])
    faint, missed = [], []
    for scene in render_scenes(NATIVE[:16], "flat_lay", 33, "eval", size=(1200, 900)):
        out = np.asarray(bytes_to_canonical(scene.data, SPEC).image)
        if out.max() < 200:  # nothing found (a white garment on a white sheet can be too faint)
            missed.append(scene.detail)
            continue
        faint.append(((out > 8) & (out < 48)).mean())
    assert len(missed) <= 2, missed
    assert np.median(faint) < 2.5 * native and max(faint) < 0.2, (native, np.round(faint, 3))


@pytest.mark.parametrize("colour", ["mustard", "pastel blue", "light grey", "red"])
def test_a_coloured_or_light_garment_stays_visible_in_the_grey_the_model_sees(colour):
    """The grey is the colour distance from the backdrop: a mustard or pastel garment on white (low in
    luminance contrast) comes out as bright as a navy one, with its shape."""
    from scripts.train.scenes import GARMENT_COLOURS, garment_layer, paste

    rng = np.random.default_rng(5)
    canvas = np.full((600, 800, 3), 247.0, dtype=np.float32)
    layer = garment_layer(NATIVE[3], 360, np.asarray(GARMENT_COLOURS[colour], dtype=np.float32), rng)
    canvas = paste(canvas, layer, 220, 120)
    out = np.asarray(canon(Image.fromarray(canvas.astype(np.uint8))), dtype=float)
    silhouette = np.asarray(Image.fromarray(NATIVE[3]).resize((28, 28))) > 30
    assert out[silhouette].mean() > 120 and out[~silhouette].mean() < 40, (colour, out[silhouette].mean())
