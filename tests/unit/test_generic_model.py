"""The same handler serves any image classifier by configuration alone.

A scripted torchvision ResNet-18 (random weights, built by scripts/train/build_resnet.py)
with a spec of 3 channels, 224x224, resize-256-then-centre-crop and ImageNet
mean/std is loaded by the unchanged ``TTAClassifierHandler`` through TorchServe's
real ``Context``, from a model directory laid out as TorchServe unpacks a .mar
(spec.json beside the .pt), and a JPEG photo gets a 1000-class answer.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from handler.preprocess import Prepared
from handler.spec import IMAGENET_MEAN, IMAGENET_STD
from scripts.train.build_resnet import build
from tests.conftest import make_context, run_batch, write_manifest


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    built = build(tmp_path_factory.mktemp("resnet_build"))
    model_dir = tmp_path_factory.mktemp("resnet_model")
    shutil.copy(built["model"], model_dir / "resnet18.pt")
    shutil.copy(built["spec"], model_dir / "spec.json")
    write_manifest(model_dir, "resnet18", "resnet18.pt")
    return model_dir


@pytest.fixture(scope="module")
def resnet_handler(resnet_dir):
    from handler.tta_classifier import TTAClassifierHandler

    threads = torch.get_num_threads()
    ctx = make_context(resnet_dir, {"minWorkers": 1, "maxWorkers": 1, "handler": {"threads": 1}})
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    yield handler, ctx
    torch.set_num_threads(threads)  # the loader sets a process-wide value: leave it as we found it


def photo_jpeg(width: int = 640, height: int = 427) -> bytes:
    """A photo-like RGB JPEG (smooth gradients + texture), landscape like sklearn's sample photos."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    rgb = np.stack([xx / width * 255, yy / height * 255, (xx + yy) % 97 * 2.6], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_the_resnet_spec_is_what_the_brief_asks(resnet_handler):
    handler, _ = resnet_handler
    spec = handler.spec
    assert (spec.channels, spec.input_size, spec.resize, spec.resize_size) == (3, (224, 224), "crop", 256)
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert spec.num_classes == 1000 and spec.class_names[0] == "class_000" and spec.class_names[-1] == "class_999"
    assert torch.get_num_threads() == 1  # handler: threads from the model-config reached the worker


def test_a_jpeg_photo_gets_a_1000_class_answer(resnet_handler):
    handler, ctx = resnet_handler
    jpeg = photo_jpeg()
    statuses, bodies = run_batch(handler, ctx, [({"body": jpeg}, {"Content-Type": "image/jpeg"}),
                                                ({"body": jpeg}, {"X-Top-K": "1000", "X-TTA": "off"})])
    assert statuses == [200, 200]
    default, everything = bodies
    assert len(default["top_k"]) == 5 and default["tta_views"] == 2
    assert default["label"] == f"class_{default['class_index']:03d}" and 0 <= default["class_index"] < 1000
    ranked = everything["top_k"]
    assert len(ranked) == 1000 and everything["tta_views"] == 1
    assert sorted(r["class_index"] for r in ranked) == list(range(1000))
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0, abs=1e-3)
    assert [r["probability"] for r in ranked] == sorted((r["probability"] for r in ranked), reverse=True)


def test_the_photo_is_resized_to_256_and_centre_cropped_to_224(resnet_handler):
    handler, ctx = resnet_handler
    from handler.preprocess import prepare

    prepared = prepare({"body": photo_jpeg(640, 427)}, {}, handler.spec)
    assert isinstance(prepared, Prepared)
    (tensor,) = prepared.tensors
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    # 640x427 -> 383x256 -> centre 224x224: the crop keeps the middle, so the red channel
    # (a left-to-right ramp) is centred on mid-grey after ImageNet normalisation.
    # Columns 80..303 of the 383-wide resized image: original x from ~134 to ~507 of 640.
    red = tensor[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert float(red[:, 112].mean()) == pytest.approx(0.5, abs=0.03)
    assert float(red[:, 0].mean()) == pytest.approx(134 / 640, abs=0.03)
    assert float(red[:, -1].mean()) == pytest.approx(507 / 640, abs=0.03)


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (300, 300), (1001, 257)])
def test_resizing_only_the_crop_region_equals_resizing_the_whole_photo_then_cropping(resnet_handler, size):
    from handler.preprocess import resize

    spec = resnet_handler[0].spec
    img = Image.open(io.BytesIO(photo_jpeg(*size))).convert("RGB")
    w, h = img.size
    new_w, new_h = (spec.resize_size, int(spec.resize_size * h / w)) if w <= h else (int(spec.resize_size * w / h), spec.resize_size)
    left, top = int(round((new_w - 224) / 2.0)), int(round((new_h - 224) / 2.0))
    whole = img.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + 224, top + 224))
    assert resize(img, spec).size == (224, 224)
    diff = np.abs(np.asarray(resize(img, spec), dtype=int) - np.asarray(whole, dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_describe_reports_the_resnet_contract(resnet_handler):
    handler, ctx = resnet_handler
    statuses, (body,) = run_batch(handler, ctx, [({"body": b""}, {"describe": "true"})])
    assert statuses == [200]
    assert len(body["classes"]) == 1000
    assert body["input"] == {"size": [224, 224], "channels": 3, "resize": "crop", "mean": list(IMAGENET_MEAN),
                             "std": list(IMAGENET_STD), "background": [0, 0, 0]}


def test_an_explanation_of_a_resnet_photo_falls_back_to_input_x_gradient(resnet_handler):
    import base64

    handler, ctx = resnet_handler
    jpeg = photo_jpeg()
    statuses, bodies = run_batch(handler, ctx, [({"body": jpeg}, {"X-TTA": "off"}),
                                                ({"body": jpeg}, {"X-TTA": "off", "explain": "True", "X-Explain-Class": "class_007"})])
    assert statuses == [200, 200]
    exp = bodies[1]["explanation"]
    assert exp["method"] == "input-x-gradient" and exp["class_index"] == 7 and exp["label"] == "class_007"
    heat = Image.open(io.BytesIO(base64.b64decode(exp["heatmap_png"])))
    seen = Image.open(io.BytesIO(base64.b64decode(exp["input_png"])))
    assert (heat.mode, heat.size) == ("L", (224, 224)) and (seen.mode, seen.size) == ("RGB", (224, 224))
    assert np.asarray(heat).max() == 255
    assert "explanation" not in bodies[0]
