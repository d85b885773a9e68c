"""The doctor names each classic fault in a deliberately broken model and passes the shipped one.

Each broken model is a small TorchScript module: the shipped model wrapped the way the fault happens
in practice (trained with another normalisation or polarity, a softmax left at the end, dropout left in
training mode, a bias that collapses every answer onto one class, a squeeze that loses the batch
dimension), or a tiny CNN built for 32x32 inputs, each saved with the shipped spec.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from handler.loader import read_model
from scripts.diagnose import doctor
from scripts.train.data import REPO
from tests.conftest import DATA
from tests.faulty_models import Collapsed, DropoutOn, Softmaxed, TrainedInverted, TrainedOnUnitRange, Unbatched

SHIPPED = REPO / "models" / "fashion_cnn.pt"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"dataset not found at {DATA}")


class For32(nn.Module):
    """A tiny CNN whose classifier was sized for 32x32 inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.max_pool2d(torch.relu(self.conv(x)), 2), 1))


@pytest.fixture(scope="module")
def shipped():
    artifact = read_model(SHIPPED)
    return artifact.model.eval(), artifact.spec


def save(module: nn.Module, spec, path, training: tuple[str, ...] = ()):
    scripted = torch.jit.script(module.eval())
    for name in training:
        getattr(scripted, name).train()
    scripted.save(str(path), _extra_files={"spec.json": spec.to_json()})
    return path


def run(path, out, *extra) -> tuple[int, dict[str, dict]]:
    rc = doctor.main(["--model", str(path), "--out", str(out), "--limit", "200", *extra])
    doc = json.loads((out / "report.json").read_text())
    return rc, {c["check"]: c for c in doc["checks"]}


def test_the_shipped_model_passes_every_check_and_gets_its_figures(tmp_path, capsys):
    rc, checks = run(SHIPPED, tmp_path)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [c["status"] for c in checks.values()] == ["PASS"] * 6
    assert checks["normalisation"]["evidence"]["accuracy"]["spec"] > 0.85
    assert "verdict: all checks pass" in printed
    for name in ("filters.png", "feature_maps.png", "confusion_matrix.png", "explanations.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"![{name}]({name})" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("make, check, fragment", [
    (lambda m, s: TrainedOnUnitRange(m, s.mean[0], s.std[0]), "normalisation", "'[0,1]' gives"),
    (lambda m, s: TrainedInverted(m, s.mean[0], s.std[0]), "channel order and polarity", "'inverted intensities' gives"),
    (lambda m, s: Softmaxed(m), "logits", "the outputs are probabilities"),
    (lambda m, s: Collapsed(m), "collapse", "predictions collapse: most frequent prediction class 3 on 100.0 %"),
    (lambda m, s: Unbatched(m), "input shape", "missing batch dimension"),
    (lambda m, s: For32(), "input shape", "wrong input size: the model runs on 32x32 inputs, the spec says 28x28"),
], ids=["normalisation", "polarity", "probabilities", "collapsed", "unbatched", "wrong-size"])
def test_each_fault_is_named(shipped, tmp_path, make, check, fragment):
    model, spec = shipped
    path = save(make(model, spec), spec, tmp_path / "broken.pt")
    rc, checks = run(path, tmp_path / "doctor", "--no-figures")
    assert rc == 1
    assert checks[check]["status"] == "FAIL" and fragment in checks[check]["summary"], checks[check]
    failed = {name for name, c in checks.items() if c["status"] == "FAIL"}
    assert failed == {check}, failed  # the fault is named, and only it


def test_dropout_left_on_is_caught_with_the_module_that_is_training(shipped, tmp_path):
    model, spec = shipped
    path = save(DropoutOn(model), spec, tmp_path / "dropout.pt", training=("drop",))
    rc, checks = run(path, tmp_path / "doctor", "--no-figures")
    assert rc == 1 and checks["eval mode"]["status"] == "FAIL"
    assert "drop (Dropout)" in checks["eval mode"]["summary"]


def test_a_separate_spec_file_is_used_and_a_wrong_class_count_is_named(shipped, tmp_path):
    model, spec = shipped
    path = tmp_path / "bare.pt"
    torch.jit.script(Softmaxed(model)).save(str(path))  # no spec inside
    wrong = json.loads(spec.to_json())
    wrong["class_names"] = wrong["class_names"][:8]
    (tmp_path / "spec.json").write_text(json.dumps(wrong))
    rc, checks = run(path, tmp_path / "doctor", "--no-figures", "--spec", str(tmp_path / "spec.json"))
    assert rc == 1 and "the model outputs 10 classes, the spec names 8" in checks["input shape"]["summary"]
