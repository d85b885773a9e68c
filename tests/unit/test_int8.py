"""The int8 variant (scripts/train/quantize.py, written by scripts/train/export.py): served by the same
handler when model-config.yaml says ``precision: int8``, close to fp32 on the held-out images, refused by
the loader and the packager when it is missing or wrong, and the exporter's acceptance check."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from handler.errors import SpecError
from handler.inference import Policy, classify
from handler.loader import EXTRA_FILES, QUANTIZATION_FILENAME, int8_path, load, read_extra_file, read_model
from scripts.train import quantize
from scripts.train.data import REPO, eval_inputs
from scripts.train.export import ExportRefused, check_int8
from tests.conftest import make_context, run_batch, shipped_handler, write_manifest

FP32 = REPO / "models" / "fashion_cnn.pt"
INT8 = int8_path(FP32)
EXAMPLES = REPO / "examples"

pytestmark = pytest.mark.skipif(not INT8.exists(), reason="no models/fashion_cnn.int8.pt: run python -m scripts.train.export")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """fp32 and int8 handlers on the shipped model, as TorchServe's worker runs them."""
    threads = torch.get_num_threads()
    yield {p: shipped_handler(tmp_path_factory.mktemp(p), precision=p) for p in ("fp32", "int8")}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quantization() -> dict:
    return json.loads(read_extra_file(INT8, QUANTIZATION_FILENAME))


def model_dir_with(folder, int8_file=None):
    """An unpacked archive: the shipped fp32 model and, if given, ``int8_file`` as fashion_cnn.int8.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FP32, folder / "fashion_cnn.pt")
    if int8_file is not None:
        shutil.copy(int8_file, folder / "fashion_cnn.int8.pt")
    return write_manifest(folder, "fashion_cnn", "fashion_cnn.pt")


def resaved_int8(path, spec_change=None, quantization_change=None):
    """The shipped int8 file saved again with a changed spec.json or quantization.json."""
    extra = dict.fromkeys((*EXTRA_FILES, QUANTIZATION_FILENAME), "")
    model = torch.jit.load(str(INT8), _extra_files=extra)
    for name, change in (("spec.json", spec_change), (QUANTIZATION_FILENAME, quantization_change)):
        if change:
            extra[name] = json.dumps({**json.loads(extra[name]), **change})
    model.save(str(path), _extra_files=extra)
    return path


def test_int8_serves_through_the_real_handler_with_its_own_golden_answers(served, tmp_path):
    handler, ctx = served["int8"]
    assert handler.model.original_name == "Int8Classifier" and "quantized::" in str(handler.model.inlined_graph)
    assert handler.explainer.model.original_name == "FashionCNN"  # explanations: the unfrozen fp32 model
    statuses, bodies = run_batch(handler, ctx, [({"body": (EXAMPLES / f"{n}.png").read_bytes()}, {})
                                                for n in ("coat", "sneaker", "trouser")])
    assert statuses == [200] * 3
    assert [b["label"] for b in bodies] == ["Coat", "Sneaker", "Trouser"]
    assert all(not b["out_of_distribution"] for b in bodies)
    loaded = load(make_context(model_dir_with(tmp_path, INT8), {"handler": {"precision": "int8", "threads": 1}}))
    assert loaded.precision == "int8" and loaded.model.original_name == "Int8Classifier"
    assert loaded.golden and loaded.golden == read_model(INT8).golden  # the int8 file's golden.json, not fp32's
    assert loaded.artifact.model.original_name == "FashionCNN" and loaded.artifact.golden == read_model(FP32).golden


def test_an_explanation_under_int8_comes_from_the_fp32_model(served):
    (handler, ctx), (fp32_handler, fp32_ctx) = served["int8"], served["fp32"]
    request = [({"body": (EXAMPLES / "ankle_boot.png").read_bytes()}, {"explain": "True"})]
    (status,), (int8_body,) = run_batch(handler, ctx, request)
    _, (fp32_body,) = run_batch(fp32_handler, fp32_ctx, request)
    assert status == 200 and int8_body["label"] == fp32_body["label"] == "Ankle boot"
    assert int8_body["explanation"] == fp32_body["explanation"]


def test_int8_and_fp32_agree_on_the_held_out_images(holdout):
    images, labels = holdout
    fp32, int8 = read_model(FP32), read_model(INT8)
    x, signals = eval_inputs(images, fp32.spec)
    policy = Policy.from_spec(fp32.spec, fp32.ood)
    answers = {}
    for name, artifact in (("fp32", fp32), ("int8", int8)):
        result = classify(artifact.model, x, torch.ones(len(x), dtype=torch.bool), policy, signals)
        answers[name] = (result.probs.argmax(1).numpy(), result.ood.numpy())
    figures = quantize.compare(answers["fp32"][0], answers["int8"][0], labels)
    assert figures["agreement"] >= 0.99
    assert figures["accuracy_drop"] <= 0.3
    assert (answers["fp32"][1] == answers["int8"][1]).mean() >= 0.97
    with torch.inference_mode():  # float logits (quantize.FLOAT_MODULES): no two classes tie exactly
        top2 = int8.model(x).topk(2).values
    assert not (top2[:, 0] == top2[:, 1]).any()


def test_the_int8_file_records_figures_that_meet_its_thresholds(quantization):
    assert quantization["engine"] in torch.backends.quantized.supported_engines
    assert quantization["qconfig"]["weight"]["qscheme"] == "per_channel_symmetric"
    assert quantization["calibration"]["split"] == "train" and quantization["calibration"]["images"] > 1000
    thresholds = quantize.Thresholds(**quantization["thresholds"])
    assert thresholds == quantize.Thresholds()  # exported with the defaults
    figures = quantization["figures"]
    assert {"native", "photos", "outliers"} <= figures.keys()
    for name in ("native", "photos"):
        assert {"tta_off", "tta_on", "ood"} <= figures[name].keys()
    assert quantize.shortfalls(figures, thresholds) == []
    fp32, int8 = read_model(FP32), read_model(INT8)
    assert int8.spec == fp32.spec and int8.ood == fp32.ood and int8.reference == fp32.reference


def test_int8_is_frozen_like_fp32_unless_optimize_is_off_with_the_same_answers(tmp_path):
    model_dir = model_dir_with(tmp_path, INT8)
    served = {optimize: load(make_context(model_dir, {"handler": {"precision": "int8", "optimize": optimize,
                                                                   "threads": 1}})).model
              for optimize in (True, False)}
    assert not list(served[True].children()) and list(served[False].children())  # frozen, and as exported
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        frozen, exported = served[True].forward_features(x), served[False].forward_features(x)
    assert torch.equal(frozen[0].argmax(1), exported[0].argmax(1))
    for a, b in zip(frozen, exported):  # the float layers may be fused differently: float noise only
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("precision", ["fp16", "INT8", True, 8])
def test_an_invalid_precision_is_refused_with_the_valid_values(tmp_path, precision):
    ctx = make_context(model_dir_with(tmp_path, INT8), {"handler": {"precision": precision, "threads": 1}})
    with pytest.raises(SpecError, match=r"handler.precision must be one of fp32, int8"):
        load(ctx)


def test_int8_without_an_int8_file_is_refused_naming_the_file_and_how_to_make_it(tmp_path):
    ctx = make_context(model_dir_with(tmp_path), {"handler": {"precision": "int8", "threads": 1}})
    with pytest.raises(SpecError) as info:
        load(ctx)
    assert "fashion_cnn.int8.pt" in str(info.value) and "scripts.train.export" in str(info.value)
    assert load(make_context(model_dir_with(tmp_path), {"handler": {"threads": 1}})).precision == "fp32"  # the default


def test_an_int8_file_from_another_export_or_for_another_engine_is_refused(tmp_path):
    config = {"handler": {"precision": "int8", "threads": 1}}
    stale = resaved_int8(tmp_path / "stale.pt", spec_change={"temperature": 1.5})
    with pytest.raises(SpecError, match="another spec.json than the fp32 model"):
        load(make_context(model_dir_with(tmp_path / "stale", stale), config))
    alien = resaved_int8(tmp_path / "alien.pt", quantization_change={"engine": "vnni9000"})
    with pytest.raises(SpecError, match="'vnni9000' engine, which this torch build does not support"):
        load(make_context(model_dir_with(tmp_path / "alien", alien), config))


def test_packaging_ships_the_int8_file_and_fails_when_the_config_asks_for_a_missing_one(tmp_path):
    from scripts.deploy import package

    parser = package.get_args_parser()
    mar = package.main(parser.parse_args(["--export-path", str(tmp_path / "store")]))
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        assert {"fashion_cnn.pt", "fashion_cnn.int8.pt", "model-config.yaml"} <= names
        assert archive.read("fashion_cnn.int8.pt") == INT8.read_bytes()

    lone = tmp_path / "lone" / "other.pt"
    lone.parent.mkdir()
    shutil.copy(FP32, lone)
    config = tmp_path / "int8.yaml"
    config.write_text("handler:\n  precision: int8\n")
    with pytest.raises(SystemExit, match=r"precision: int8 but there is no .*other\.int8\.pt"):
        package.main(parser.parse_args(["--model", str(lone), "--config", str(config), "--export-path", str(tmp_path)]))
    config.write_text("handler:\n  precision: float\n")
    with pytest.raises(SystemExit, match="must be one of fp32, int8"):
        package.main(parser.parse_args(["--model", str(lone), "--config", str(config), "--export-path", str(tmp_path)]))
    config.write_text("handler:\n  precision: fp32\n")
    assert package.int8_variant(lone, config) is None  # fp32 packages fine without one


def synthetic(n: int, disagree: int, int8_wrong: int, fp32_wrong: int = 50, seed: int = 0):
    """Labels and two models' predictions: fp32 wrong on ``fp32_wrong`` images; int8 differs from fp32 on
    ``disagree`` images, ``int8_wrong`` of them turning a right fp32 answer wrong (the rest fixing a wrong one)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    fp32 = labels.copy()
    fp32[:fp32_wrong] = (labels[:fp32_wrong] + 1) % 10
    int8 = fp32.copy()
    fixed = disagree - int8_wrong
    int8[:fixed] = labels[:fixed]  # fp32 was wrong there
    int8[fp32_wrong : fp32_wrong + int8_wrong] = (labels[fp32_wrong : fp32_wrong + int8_wrong] + 2) % 10
    return fp32, int8, labels


def figures_of(*per_set, ood=1.0):
    return {f"set{i}": {"n": len(p[0]), "tta_off": quantize.compare(*p), "tta_on": quantize.compare(*p),
                        "ood": {"agreement": ood, "flagged_fp32": 0.03, "flagged_int8": 0.05}}
            for i, p in enumerate(per_set)}


def test_the_exporter_accepts_int8_predictions_within_the_thresholds():
    fp32, int8, labels = synthetic(1000, disagree=10, int8_wrong=6)  # 99.0 % agreement, accuracy -0.2 points
    figures = figures_of((fp32, int8, labels))
    assert figures["set0"]["tta_off"] == {"n": 1000, "agreement": 0.99, "accuracy_fp32": 95.0, "accuracy_int8": 94.8,
                                          "accuracy_drop": 0.2}
    check_int8(figures, quantize.Thresholds())


def test_the_exporter_refuses_int8_predictions_that_disagree_saying_by_how_much():
    fp32, int8, labels = synthetic(1000, disagree=15, int8_wrong=6)  # 98.5 % agreement, accuracy -0.2 points
    with pytest.raises(ExportRefused) as info:
        check_int8(figures_of((fp32, int8, labels)), quantize.Thresholds())
    message = str(info.value)
    assert "set0, TTA off: top-1 agreement with fp32 98.50% is 0.50 points below the 99.00% required" in message
    assert "nothing was written" in message and "--no-int8" in message
    assert "accuracy" not in message.split("required")[-1]  # the accuracy drop was within its limit


def test_the_exporter_refuses_an_accuracy_drop_beyond_the_limit_on_any_set():
    good = synthetic(1000, disagree=4, int8_wrong=2)
    bad = synthetic(1000, disagree=8, int8_wrong=8, seed=1)  # 99.2 % agreement but 0.8 points less accurate
    with pytest.raises(ExportRefused, match=r"set1, TTA off: accuracy drops 0.80 points \(95.00% -> 94.20%\), "
                                            r"0.50 more than the 0.3 allowed") as info:
        check_int8(figures_of(good, bad), quantize.Thresholds())
    assert "set0" not in str(info.value)
    check_int8(figures_of(good, bad), quantize.Thresholds(max_accuracy_drop=0.8))  # the threshold is an option


def test_the_exporter_refuses_int8_whose_out_of_distribution_flags_move():
    fp32, int8, labels = synthetic(1000, disagree=0, int8_wrong=0)
    with pytest.raises(ExportRefused, match=r"set0: out_of_distribution flag agrees with fp32 on 95.00% of images, "
                                            r"2.00 points below the 97.00% required"):
        check_int8(figures_of((fp32, int8, labels), ood=0.95), quantize.Thresholds())
