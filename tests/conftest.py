"""Shared fixtures: a tiny scripted CNN with fixed weights, and TorchServe's real Context
object wired to fake requests (no server), so the handler runs exactly as in a worker."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.loader import read_extra_file
from handler.spec import SPEC_FILENAME, ModelSpec
from scripts.train.data import fashion_spec

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets" / "fashion-mnist-subset"
# The shipped model's TTA views (X-TTA: all runs every one of them), from the spec saved with it.
SHIPPED_VIEWS = len(json.loads(read_extra_file(REPO / "models" / "fashion_cnn.pt", SPEC_FILENAME))["tta"])


class TinyCNN(nn.Module):
    """Small but real: conv + BN + ReLU + pool + dropout + linear, fixed seeded weights."""

    def __init__(self, channels: int = 1, classes: int = 10):
        super().__init__()
        torch.manual_seed(1234)
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.features(x), 1)))


def save_scripted(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    model.eval()
    torch.jit.script(model).save(str(path), _extra_files={"spec.json": spec.to_json()})
    return path


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt, **save_kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return fashion_spec(tta=("identity", "hflip", "shift(1,0)", "shift(-1,0)"), temperature=1.0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_spec) -> Path:
    """A model directory as TorchServe unpacks a .mar: MAR-INF/MANIFEST.json + model.pt."""
    model_dir = tmp_path_factory.mktemp("tiny_model")
    save_scripted(TinyCNN(), tiny_spec, model_dir / "tiny.pt")
    return write_manifest(model_dir, "tiny", "tiny.pt")


def write_manifest(model_dir: Path, name: str, serialized_file: str) -> Path:
    """MAR-INF/MANIFEST.json, as TorchServe finds it in an unpacked .mar; returns ``model_dir``."""
    (model_dir / "MAR-INF").mkdir(exist_ok=True)
    manifest = {"model": {"modelName": name, "modelVersion": "1.0", "serializedFile": serialized_file,
                          "handler": "tta_classifier.py"}}
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return model_dir


def shipped_handler(model_dir: Path, **handler_settings):
    """The shipped model served by the handler in TorchServe's real Context, one worker, one thread: (handler, ctx).

    ``handler_settings`` go to the config's ``handler:`` section (``precision="int8"``: the int8 variant,
    copied into the model folder as the archive carries it)."""
    from handler.tta_classifier import TTAClassifierHandler

    shutil.copy(REPO / "models" / "fashion_cnn.pt", model_dir / "fashion_cnn.pt")
    if (REPO / "models" / "fashion_cnn.int8.pt").exists():
        shutil.copy(REPO / "models" / "fashion_cnn.int8.pt", model_dir / "fashion_cnn.int8.pt")
    ctx = make_context(write_manifest(model_dir, "fashion_cnn", "fashion_cnn.pt"),
                       {"maxWorkers": 1, "handler": {"threads": 1, **handler_settings}})
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    return handler, ctx


def make_context(model_dir: Path, yaml_config: dict | None = None) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    metrics = MetricsCacheYamlImpl(str(REPO / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest["model"]["modelName"]
    ctx = Context(manifest["model"]["modelName"], str(model_dir), manifest, 8, None, "0.12.0",
                  metrics=metrics, model_yaml_config=yaml_config or {})
    return ctx


def same_answer(a, b, tol: float = 1e-5) -> bool:
    """Same answer: equal labels, indices, order and flags; probabilities equal up to float noise
    (a batch of 8 and a batch of 1 can differ by ~4e-6 in a logit, enough to flip a 6th decimal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_answer(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_answer(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def run_batch(handler, ctx: Context, requests: list[tuple[dict, dict]]):
    """Send a batch through handler.handle as TorchServe's worker does: [(item, headers), ...]."""
    ctx.request_processor = [RequestProcessor(dict(headers)) for _, headers in requests]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    ctx.metrics.set_request_ids(ctx.request_ids)
    out = handler.handle([item for item, _ in requests], ctx)
    statuses = [ctx.get_response_status(i)[0] for i in range(len(requests))]
    return statuses, [json.loads(o) for o in out]


@pytest.fixture
def tiny_handler(tiny_model_dir):
    from handler.tta_classifier import TTAClassifierHandler

    ctx = make_context(tiny_model_dir)
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture(scope="session")
def holdout():
    """The trained model's held-out split (images, labels), as saved in the checkpoint split."""
    from scripts.train.data import load_idx_dir, split

    if not DATA.exists():
        pytest.skip(f"dataset not found at {DATA}")
    ds = load_idx_dir(DATA)
    parts = split(ds, seed=0)
    return ds.images[parts.holdout], ds.labels[parts.holdout]


@pytest.fixture(scope="session")
def served_model_path() -> Path:
    return REPO / "models" / "fashion_cnn.pt"



@pytest.fixture(scope="session")
def digits_task(tmp_path_factory) -> Path:
    """The second task (scripts/byo/digits.py), trained here once per session: a CNN on scikit-learn's
    handwritten digits (a few seconds), its labelled folder data/<digit>/ (the digits it did not train on),
    true_spec.json, and other domains' images in other/ (Fashion-MNIST garments when the shared subset is
    present, photos shipped with scikit-image and scikit-learn)."""
    from scripts.byo import digits

    out = tmp_path_factory.mktemp("digits")
    digits.main(digits.get_args_parser().parse_args(["--out", str(out), "--other", "200"]))
    return out
