"""Bring your own classifier (scripts/byo): the spec proposed from measurements, each fault refused by name,
the features a TorchScript model offers, and an archive served by the handler in TorchServe's real Context
with its golden inputs guarding it.

The second task is scripts/byo/digits.py (trained once per session by the ``digits_task`` fixture); the
Fashion CNN is the shipped model. Broken models wrap the digits CNN the way each fault happens in practice.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from handler.loader import read_model
from handler.spec import ModelSpec
from scripts.byo import archive, folder, propose
from scripts.byo.features import read_features
from scripts.train.data import REPO
from tests.conftest import DATA, make_context, run_batch, write_manifest
from tests.faulty_models import Collapsed, DropoutOn, Softmaxed, TrainedInverted, TrainedOnUnitRange, Unbatched

SHIPPED = REPO / "models" / "fashion_cnn.pt"


# --- models with a fault ------------------------------------------------------------------------------------
class For16(nn.Module):
    """The digits model behind an average pooling: it takes 16x16 inputs only."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 16 or x.shape[-2] != 16:
            raise ValueError("16x16 inputs only")
        return self.inner(torch.nn.functional.avg_pool2d(x, 2))


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model(digits_task):
    return torch.jit.load(str(digits_task / "digits_cnn.pt")).eval()


@pytest.fixture(scope="module")
def true_spec(digits_task) -> ModelSpec:
    return ModelSpec.from_json((digits_task / "true_spec.json").read_text())


def subset(src, dst, per_class: int):
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for path in sorted(cls.glob("*.png"))[:per_class]:
            shutil.copy(path, dst / cls.name / path.name)
    return dst


@pytest.fixture(scope="module")
def small_digits(digits_task, tmp_path_factory):
    return subset(digits_task / "data", tmp_path_factory.mktemp("digits15"), 15)


def run_archive(tmp_path, model, data, name="mynet", spec=None, *extra):
    path = tmp_path / "model.pt"
    if isinstance(model, torch.jit.ScriptModule):
        model.save(str(path))
    else:
        torch.jit.script(model).save(str(path))
    argv = ["--model", str(path), "--data", str(data), "--name", name, "--out", str(tmp_path / "out"),
            "--store", str(tmp_path / "store"), *extra]
    if spec is not None:
        (tmp_path / "spec.json").write_text(spec.to_json())
        argv += ["--spec", str(tmp_path / "spec.json")]
    return archive.main(archive.get_args_parser().parse_args(argv))


# --- the proposed spec -------------------------------------------------------------------------------------
def test_the_proposed_spec_for_the_digits_model_is_the_one_it_was_trained_with(digits_model, digits_task, true_spec):
    proposal = propose.propose(digits_model, folder.load(digits_task / "data"), "digits")
    spec = proposal.spec
    assert (spec.channels, spec.input_size, spec.resize) == (true_spec.channels, true_spec.input_size, true_spec.resize)
    assert spec.mean == true_spec.mean == (0.5,) and spec.std == true_spec.std == (0.5,)  # [-1,1], not the images' own
    assert spec.background == true_spec.background == (0,) and proposal.polarity == "light objects on a dark background"
    assert spec.class_names == true_spec.class_names
    assert proposal.best.convention == "[-1,1]" and proposal.best.accuracy > 0.9


@pytest.mark.skipif(not DATA.exists(), reason=f"dataset not found at {DATA}")
def test_the_proposed_spec_for_the_fashion_cnn_is_its_own(holdout, tmp_path):
    images, labels = holdout
    true = read_model(SHIPPED).spec
    rows = np.linspace(0, len(labels) - 1, 400).round().astype(int)
    for row in rows:  # a folder per class, named as a user would: '/' cannot be in a folder name
        d = tmp_path / true.class_names[labels[row]].replace("/", "_")
        d.mkdir(exist_ok=True)
        Image.fromarray(images[row]).save(d / f"{row}.png")
    model = read_model(SHIPPED).model
    proposal = propose.propose(model, folder.load(tmp_path), "fashion")
    spec = proposal.spec
    assert (spec.channels, spec.input_size, spec.resize, spec.background) == (1, (28, 28), "pad", (0,)) == (
        true.channels, true.input_size, true.resize, true.background)
    # the class folders' alphabetical order is not the model's: matched by its answers, every class in place
    assert proposal.order == "matched"
    assert spec.class_names == tuple(n.replace("/", "_") for n in true.class_names)
    # the training statistics, as measured on the user's images (not [-1,1], the next best)
    assert proposal.best.convention == "the images' mean/std"
    assert abs(spec.mean[0] - true.mean[0]) < 0.01 and abs(spec.std[0] - true.std[0]) < 0.01, (spec.mean, spec.std)


def test_a_model_trained_on_unit_range_pixels_gets_unit_range(digits_model, small_digits):
    proposal = propose.propose(torch.jit.script(TrainedOnUnitRange(digits_model, 0.5, 0.5)), folder.load(small_digits), "x")
    assert proposal.best.convention == "[0,1]" and proposal.spec.mean == (0.0,) and proposal.spec.std == (1.0,)


def test_a_model_for_16x16_inputs_gets_16x16(digits_model, small_digits):
    proposal = propose.propose(torch.jit.script(For16(digits_model)), folder.load(small_digits), "x")
    assert proposal.spec.input_size == (16, 16) and [1, 16, 16] in proposal.accepted_shapes


# --- faults are refused by name ------------------------------------------------------------------------------
FAULTS = [
    ("normalisation", lambda m: TrainedOnUnitRange(m, 0.5, 0.5), True, "normalisation", "'[0,1]' gives"),
    ("polarity-spec", lambda m: TrainedInverted(m, 0.5, 0.5), True, "channel order and polarity", "'inverted intensities' gives"),
    ("polarity", lambda m: TrainedInverted(m, 0.5, 0.5), False, "channel order and polarity", "your images' negative far better"),
    ("probabilities", Softmaxed, False, "logits", "the outputs are probabilities"),
    # a bias of 1e6: the digits CNN's logits reach +-50 on its inputs' negatives and +-2,500 under the 0-255 convention
    ("collapsed", lambda m: Collapsed(m, 1e6), False, "collapse", "predictions collapse: most frequent prediction class 3"),
    ("unbatched", Unbatched, False, "input shape", "missing batch dimension"),
    ("wrong-size", For16, True, "input shape", "wrong input size: the model runs on 16x16 inputs, the spec says 8x8"),
]


@pytest.mark.parametrize("make, with_spec, check, fragment", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_each_fault_is_refused_with_the_fault_named(digits_model, true_spec, small_digits, tmp_path, make, with_spec,
                                                      check, fragment):
    with pytest.raises(archive.ArchiveRefused) as refused:
        run_archive(tmp_path, make(digits_model), small_digits, "broken", true_spec if with_spec else None)
    assert refused.value.check == check and fragment in str(refused.value), (refused.value.check, str(refused.value))
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())  # nothing archived


def test_dropout_left_on_is_refused_before_anything_is_proposed(digits_model, small_digits, tmp_path):
    scripted = torch.jit.script(DropoutOn(digits_model).eval())
    scripted.drop.train()
    with pytest.raises(archive.ArchiveRefused) as refused:
        run_archive(tmp_path, scripted, small_digits, "broken")
    assert refused.value.check == "eval mode" and "drop (Dropout)" in str(refused.value)
    assert not (tmp_path / "out" / "spec.proposed.json").exists()


def test_a_bad_name_or_folder_is_refused_with_what_to_do(digits_model, small_digits, tmp_path):
    with pytest.raises(archive.ArchiveRefused, match="becomes the URL"):
        run_archive(tmp_path, digits_model, small_digits, "my net")
    with pytest.raises(folder.DataError, match="one sub-folder per class"):
        run_archive(tmp_path, digits_model, small_digits / "3", "mynet")


# --- features ------------------------------------------------------------------------------------------------
class NotAChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.b(self.a(x) + x)  # a residual: not its children in order


def test_a_sequential_model_is_read_through_its_submodules(digits_model):
    x = torch.randn(6, 1, 8, 8)
    feats = read_features(digits_model, [x])
    assert feats.source == "submodules"
    assert [name for name, _, _ in feats.layers] == ["1", "3", "6", "10"]  # each block's end, not pools or flatten
    buffer = io.BytesIO()
    torch.jit.save(feats.model, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.inference_mode():
        logits, embedding, _ = loaded.forward_features(x)
        assert torch.equal(loaded(x), digits_model(x))  # forward is the user's model, unchanged
        assert torch.allclose(logits, digits_model(x), atol=1e-6) and embedding.shape == (6, 16 + 32 + 64 + 64)


def test_a_model_that_is_not_a_chain_falls_back_to_its_logits_and_the_shipped_model_keeps_its_own():
    feats = read_features(torch.jit.script(NotAChain().eval()), [torch.randn(3, 1, 8, 8)])
    assert feats.source == "logits" and "do not reproduce its forward" in feats.about
    shipped = read_features(read_model(SHIPPED).model, [torch.randn(2, 1, 28, 28)])
    assert shipped.source == "forward_features" and shipped.layers[0][2] == 352


# --- an archive, served -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_archive(digits_task, tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    data = subset(digits_task / "data", root / "data", 40)
    doc = run_archive(root, torch.jit.load(str(digits_task / "digits_cnn.pt")), data, "digits_unit")
    model_dir = root / "unpacked"
    with zipfile.ZipFile(root / "store" / "digits_unit.mar") as mar:
        mar.extractall(model_dir)
    return root, doc, model_dir


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_archive_carries_what_the_report_says(small_archive):
    root, doc, model_dir = small_archive
    artifact = read_model(model_dir / "digits_unit.pt", model_dir)
    spec = artifact.spec
    assert spec.name == "digits_unit" and spec.ood.method == "features" and spec.ood.false_alarm_rate == 0.03
    assert spec.temperature != 1.0 and 0.5 <= spec.threshold <= 1.0 and artifact.ood is not None
    assert [g["name"].split("_")[0] for g in artifact.golden] == ["image", "image", "image", "outlier"]
    assert artifact.reference["n"] == doc["test"]["n"] == 200 and artifact.reference["test_figures"] == doc["test"]
    for picture in ("confusion_matrix.png", "reliability.png", "ood_scores.png", "doctor/confusion_matrix.png"):
        assert (root / "out" / picture).stat().st_size > 2000, picture
    text = (root / "out" / "report.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in text and "ECE before calibration" in text
    assert json.loads((root / "out" / "report.json").read_text())["spec"]["name"] == "digits_unit"
    assert (model_dir / "model-config.yaml").read_text().count("precision: fp32") == 1


def test_the_handler_serves_the_archive_and_flags_what_is_not_a_digit(small_archive, digits_task):
    from handler.tta_classifier import TTAClassifierHandler

    _, _, model_dir = small_archive
    write_manifest(model_dir, "digits_unit", "digits_unit.pt")
    handler = TTAClassifierHandler()
    threads = torch.get_num_threads()
    ctx = make_context(model_dir, {"maxWorkers": 1, "handler": {"threads": 1}})
    try:
        handler.initialize(ctx)  # the golden inputs are answered as at export, or this raises
        digits = sorted((digits_task / "data" / "7").glob("*.png"))[-5:]  # not among the 40 archived per class
        garment = np.zeros((28, 28), dtype=np.uint8)
        garment[4:24, 6:22] = 220  # a bright filled block, like a garment's silhouette
        requests = [({"body": p.read_bytes()}, {}) for p in digits] + [({"body": png(garment)}, {})]
        statuses, bodies = run_batch(handler, ctx, requests)
    finally:
        torch.set_num_threads(threads)
    assert statuses == [200] * 6
    assert [b["label"] for b in bodies[:5]] == ["7"] * 5 and not any(b["out_of_distribution"] for b in bodies[:5])
    assert bodies[5]["out_of_distribution"] and bodies[5]["uncertain"]


def test_a_worker_refuses_an_archive_whose_preprocessing_changed(small_archive, tmp_path):
    from handler.tta_classifier import TTAClassifierHandler

    _, _, model_dir = small_archive
    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)
    extra = {"spec.json": "", "reference.json": "", "ood.json": "", "golden.json": ""}
    model = torch.jit.load(str(tampered / "digits_unit.pt"), _extra_files=extra)
    spec = json.loads(extra["spec.json"])
    spec["mean"] = [0.45]  # what a changed normalisation constant would do
    extra["spec.json"] = json.dumps(spec)
    model.save(str(tampered / "digits_unit.pt"), _extra_files=extra)
    write_manifest(tampered, "digits_unit", "digits_unit.pt")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="golden inputs answered differently than at export"):
            TTAClassifierHandler().initialize(make_context(tampered, {"maxWorkers": 1, "handler": {"threads": 1}}))
    finally:
        torch.set_num_threads(threads)
