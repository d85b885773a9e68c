"""Out-of-distribution answers and readiness gated on golden answers, with TorchServe's real Context."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from handler import golden
from handler.errors import SpecError
from handler.inference import Policy
from handler.loader import read_model
from handler.ood import Detector, OODSpec, energy
from handler.tta_classifier import TTAClassifierHandler
from scripts.train.data import REPO, load_idx_dir, split
from scripts.train.photos import render_all
from tests.conftest import DATA, TinyCNN, make_context, run_batch, same_answer, save_scripted
from tests.conftest import shipped_handler as load_shipped

SHIPPED = REPO / "models" / "fashion_cnn.pt"


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def text_image() -> Image.Image:
    """A line of text: not a garment (drawn here, not taken from the evaluation's sets)."""
    img = Image.new("L", (220, 60), 245)
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 28)
    ImageDraw.Draw(img).text((8, 12), "SALE 50%", fill=20, font=font)
    return img


@pytest.fixture(scope="module")
def shipped_handler(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("shipped")
    return (*load_shipped(model_dir), model_dir)


@pytest.fixture(scope="module")
def held_out():
    ds = load_idx_dir(DATA)
    idx = split(ds, seed=0).holdout[:24]
    return ds.images[idx], ds.labels[idx]


def test_the_shipped_model_offers_features_and_a_head_for_grad_cam():
    artifact = read_model(SHIPPED)
    model = artifact.model
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        logits, embedding, feature_map = model.forward_features(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(model.head(feature_map), logits, atol=1e-5)
    assert feature_map.shape[1:] == (128, 7, 7)
    assert artifact.spec.ood.method == "features" and artifact.spec.ood.threshold is not None
    assert embedding.shape[1] == max(layer["stop"] for layer in artifact.ood["layers"])
    assert {g["name"] for g in artifact.golden} == {"native", "catalogue_photo", "not_a_garment"}


def test_every_answer_says_whether_it_is_out_of_distribution(shipped_handler, held_out):
    handler, ctx, _ = shipped_handler
    images, _ = held_out
    requests = [({"body": png(Image.fromarray(g))}, {}) for g in images[:6]] + [({"body": png(text_image())}, {})]
    statuses, bodies = run_batch(handler, ctx, requests)
    assert statuses == [200] * 7
    for body in bodies:
        assert isinstance(body["out_of_distribution"], bool) and isinstance(body["ood_score"], float)
        assert body["label"] and len(body["top_k"]) == 3  # a label is always given
        if body["out_of_distribution"]:
            assert body["uncertain"] is True
    assert bodies[-1]["out_of_distribution"] is True
    assert sum(b["out_of_distribution"] for b in bodies[:6]) <= 1


def test_ood_answers_in_a_batch_equal_the_answers_alone(shipped_handler, held_out):
    handler, ctx, _ = shipped_handler
    images, _ = held_out
    photos = render_all(images[:5], "catalogue_white", seed=0)
    requests = [({"body": png(p)}, {}) for p in photos] + [({"body": png(text_image())}, {"x-tta": "off"})]
    _, batched = run_batch(handler, ctx, requests)
    for request, body in zip(requests, batched):
        _, alone = run_batch(handler, ctx, [request])
        assert same_answer(body, alone[0], tol=1e-4)


def test_explanations_show_the_parts_of_the_score(shipped_handler):
    handler, ctx, _ = shipped_handler
    _, bodies = run_batch(handler, ctx, [({"body": png(text_image())}, {"explain": "true"})])
    parts = bodies[0]["ood"]["parts"]
    assert bodies[0]["ood"]["method"] == "features"
    assert {"energy", "mahalanobis_penultimate", "border_uniformity", "box_fill"} <= set(parts)


def test_a_model_without_features_falls_back_to_the_energy_score(tiny_model_dir):
    ctx = make_context(tiny_model_dir, {"maxWorkers": 1, "handler": {"threads": 1}})
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    data = png(Image.fromarray(np.zeros((28, 28), np.uint8)))
    _, bodies = run_batch(handler, ctx, [({"body": data}, {"x-tta": "off"})])
    x = torch.full((1, 1, 28, 28), (0 - handler.spec.mean[0]) / handler.spec.std[0])
    with torch.inference_mode():
        expected = energy(handler.model(x), handler.spec.temperature)
    assert bodies[0]["ood_score"] == pytest.approx(float(expected), abs=1e-3)
    assert bodies[0]["out_of_distribution"] is False  # no threshold configured: nothing is flagged


def test_the_features_detector_needs_a_model_that_offers_features(tmp_path, tiny_spec):
    model_dir = tmp_path / "m"
    (model_dir / "MAR-INF").mkdir(parents=True)
    spec = tiny_spec.with_overrides({"ood": {"method": "features", "threshold": 1.0}})
    save_scripted(TinyCNN(), spec, model_dir / "tiny.pt")
    manifest = {"model": {"modelName": "tiny", "modelVersion": "1.0", "serializedFile": "tiny.pt", "handler": "x.py"}}
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(SpecError, match="forward_features"):
        TTAClassifierHandler().initialize(make_context(model_dir, {"maxWorkers": 1}))


@pytest.mark.parametrize("params, message", [
    (None, "carries no ood.json"),
    ({"layers": [], "combine": {"inputs": ["energy", "nose_length"], "center": [0, 0], "scale": [1, 1],
                                "weights": [0, 0, 0, 0], "bias": 0}}, "unknown parts ['nose_length']"),
    ({"layers": [], "combine": {"inputs": ["energy"], "center": [0], "scale": [1], "weights": [1], "bias": 0}},
     "weights need 2 values"),
    ({"layers": [{"name": "x"}], "combine": {}}, "ood.json is malformed"),
])
def test_malformed_detector_parameters_are_refused_at_load(params, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Detector.build(OODSpec("features", 1.0), 1.0, params)


def test_invalid_ood_settings_name_the_valid_ones(tiny_spec):
    with pytest.raises(SpecError, match="spec.ood.method must be one of features, energy"):
        tiny_spec.with_overrides({"ood": {"method": "vibes"}})


def test_golden_inputs_pass_on_the_shipped_model_and_catch_preprocessing_drift():
    artifact = read_model(SHIPPED)
    policy = Policy.from_spec(artifact.spec, artifact.ood)
    assert golden.verify(artifact.golden, artifact.model, artifact.spec, policy) == []
    drifted = artifact.spec.with_overrides({"mean": [0.3]})  # normalisation that differs from training's
    problems = golden.verify(artifact.golden, artifact.model, drifted, Policy.from_spec(drifted, artifact.ood))
    assert problems and any("probability differs" in p or "label" in p for p in problems)


def test_a_worker_refuses_to_start_when_golden_answers_differ(shipped_handler):
    _, _, model_dir = shipped_handler
    ctx = make_context(model_dir, {"maxWorkers": 1, "handler": {"threads": 1, "canonical": {"light_threshold": 0.99}}})
    with pytest.raises(RuntimeError, match="golden inputs answered differently"):
        TTAClassifierHandler().initialize(ctx)
