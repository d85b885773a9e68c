"""The spec as the single source of truth, the shipped artifacts, and the exporter's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from handler import metrics as handler_metrics
from handler.errors import SpecError
from handler.loader import read_model, resolve_threads
from handler.spec import ModelSpec
from handler.tta import split_views
from scripts.train.data import REPO, load_idx_dir, split
from scripts.train.export import ExportRefused, check_not_collapsed, check_parity
from scripts.train.model import FashionCNN
from tests.conftest import DATA


def test_spec_round_trips_through_json(tiny_spec):
    assert ModelSpec.from_json(tiny_spec.to_json()) == tiny_spec


@pytest.mark.parametrize("override, message", [
    ({"resize": "squash"}, "spec.resize must be one of pad, stretch, crop"),
    ({"merge": "max"}, "spec.merge must be one of mean_prob, mean_logit"),
    ({"tta": ["hflip"]}, "must start with 'identity'"),
    ({"tta": ["identity", "rotate(90)"]}, "valid views are identity, hflip, vflip, shift(dx,dy), zoom(f)"),
    ({"threshold": 1.5}, "threshold must be a number in [0, 1]"),
    ({"tta_gate": {"metric": "entropy", "below": 0.5}}, "tta_gate.metric must be one of top1, margin"),
    ({"tta_gate": {"metric": "top1", "below": 1.5}}, "tta_gate.below must be a number in [0, 1]"),
    ({"tta_gate": {"metric": "top1", "under": 0.5}}, "tta_gate: unknown setting(s) ['under']; valid settings are ['below', 'metric']"),
    ({"tta_gate": 0.5}, "spec.tta_gate must be an object like"),
    ({"top_k": 11}, "top_k must be an integer in 1..10"),
    ({"mean": [0.5, 0.5, 0.5]}, "spec.mean needs 1 value(s)"),
    ({"colour": "red"}, "unknown setting(s) ['colour']"),
])
def test_invalid_settings_are_refused_with_a_message_that_says_what_is_valid(tiny_spec, override, message):
    with pytest.raises(SpecError) as info:
        tiny_spec.with_overrides(override)
    assert message in str(info.value)


def test_split_views_keeps_commas_inside_parentheses():
    assert split_views("identity, hflip,shift(1,0),zoom(1.1)") == ("identity", "hflip", "shift(1,0)", "zoom(1.1)")


def test_threads_share_the_cores_between_workers(monkeypatch):
    monkeypatch.setattr("handler.loader.cpu_count", lambda: 8)
    assert resolve_threads("auto", 2) == 4 and resolve_threads("auto", 16) == 1 and resolve_threads(3, 2) == 3
    with pytest.raises(SpecError):
        resolve_threads("many", 1)


def test_the_shipped_model_carries_its_spec_and_reference():
    model, spec, reference = read_model(REPO / "models" / "fashion_cnn.pt")[:3]
    assert spec.name == "fashion_cnn" and spec.num_classes == 10 and spec.input_size == (28, 28)
    assert spec.tta[0] == "identity" and spec.temperature > 0
    assert abs(sum(reference["label_distribution"].values()) - 1) < 1e-3
    assert len(reference["confidences"]) == reference["n"]
    assert (REPO / "models" / "fashion_cnn.pt").stat().st_size < 4 * 1024 * 1024  # small enough for git


def test_the_shipped_model_is_deterministic_and_not_collapsed():
    model, spec = read_model(REPO / "models" / "fashion_cnn.pt")[:2]
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def test_metrics_yaml_declares_exactly_what_the_handler_emits():
    declared = yaml.safe_load((REPO / "metrics.yaml").read_text())["model_metrics"]
    for name, mtype, unit, dims in handler_metrics.ALL:
        entries = {m["name"]: m for m in declared[mtype.value]}
        assert name in entries, f"{name} is not declared under model_metrics.{mtype.value}"
        assert entries[name]["dimensions"] == dims and entries[name]["unit"] == unit


def test_exporter_refuses_a_scripted_model_that_differs_from_eager():
    eager = FashionCNN().eval()
    other = torch.jit.script(FashionCNN().eval())  # different random weights
    with pytest.raises(ExportRefused, match="differs from eager"):
        check_parity(eager, other, torch.randn(8, 1, 28, 28))
    assert check_parity(eager, torch.jit.script(eager), torch.randn(8, 1, 28, 28)) < 1e-5


def test_exporter_refuses_collapsed_predictions():
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(ExportRefused, match="collapsed"):
        check_not_collapsed(np.full(100, 3), labels, 10)
    with pytest.raises(ExportRefused, match="never predicted"):
        check_not_collapsed(np.where(labels == 9, 8, labels), labels, 10)
    check_not_collapsed(labels.copy(), labels, 10)


@pytest.mark.skipif(not DATA.exists(), reason="shared dataset not present")
def test_idx_subset_loads_and_splits_stratified_disjoint_and_reproducibly():
    ds = load_idx_dir(DATA)
    assert ds.images.shape == (3500, 28, 28) and ds.images.dtype == np.uint8
    a, b = split(ds, seed=0), split(ds, seed=0)
    assert np.array_equal(a.holdout, b.holdout)
    parts = [set(a.train), set(a.calib), set(a.holdout)]
    assert sum(map(len, parts)) == 3500 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    shares = np.bincount(ds.labels[a.holdout], minlength=10) / len(a.holdout)
    assert np.allclose(shares, np.bincount(ds.labels, minlength=10) / 3500, atol=0.01)


def test_packaging_a_second_version_keeps_the_first_archive(tmp_path):
    import zipfile

    from scripts.deploy import package

    for extra in ([], ["--version", "2.0", "--archive-name", "fashion_cnn_v2"]):
        package.main(package.get_args_parser().parse_args(["--export-path", str(tmp_path), *extra]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion_cnn.mar", "fashion_cnn_v2.mar"]
    for name, version in (("fashion_cnn.mar", "1.0"), ("fashion_cnn_v2.mar", "2.0")):
        with zipfile.ZipFile(tmp_path / name) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            assert manifest["model"]["modelVersion"] == version
            assert {"spec.json", "reference.json", "handler/tta_classifier.py", "model-config.yaml"} <= set(mar.namelist())
