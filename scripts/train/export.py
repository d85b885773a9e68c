"""Export a training checkpoint to the served TorchScript file, with its spec and reference.

    python -m scripts.train.export                       # build/train/checkpoint.pt -> models/fashion_cnn.pt

The exporter refuses to write the artifact unless:
- the scripted model matches the eager model on a real held-out batch (max |diff| < 1e-5);
- its held-out predictions are not collapsed onto a few classes.
It fits a softmax temperature on the calibration split (native images and the same
garments rendered as catalogue photos; never on the held-out split) so that
``confidence`` means what it says, fits the out-of-distribution detector on the
training split and synthetic outliers made from it (``scripts.train.ood``) with its
threshold set on the calibration split at a stated false-alarm rate, stores the
held-out label, confidence and out-of-distribution distributions as the drift
reference, and a few golden inputs with the answers it saw (``handler.golden``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handler import golden
from handler.inference import Policy, classify
from handler.loader import GOLDEN_FILENAME
from handler.ood import OOD_FILENAME, OODSpec
from handler.spec import REFERENCE_FILENAME, SPEC_FILENAME, ModelSpec
from handler.tta import split_views
from scripts.train import ood
from scripts.train.data import REPO, eval_inputs
from scripts.train.model import FashionCNN
from scripts.train.photos import STYLES, render_all, render_photo
from scripts.train.train import predict_logits

PARITY_TOLERANCE = 1e-5


class ExportRefused(RuntimeError):
    pass


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "build" / "train" / "checkpoint.pt")
    p.add_argument("--out", type=Path, default=REPO / "models" / "fashion_cnn.pt")
    p.add_argument("--name", default="fashion_cnn")
    p.add_argument("--tta", default=None, help="comma-separated TTA views (default: the spec's), e.g. identity,hflip")
    p.add_argument("--merge", default=None, choices=("mean_prob", "mean_logit"))
    p.add_argument("--threshold", type=float, default=None,
                   help="confidence below which answers are 'uncertain' (default: chosen by --max-confidently-wrong)")
    p.add_argument("--max-confidently-wrong", type=float, default=0.05,
                   help="choose the lowest 'uncertain' threshold at which at most this share of calibration answers "
                        "(native and photographed) is wrong without being uncertain")
    p.add_argument("--false-alarm-rate", type=float, default=0.04,
                   help="share of in-distribution calibration images the OOD threshold may flag (native and photos)")
    p.add_argument("--seed", type=int, default=0)
    return p


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Minimise the NLL of softmax(logits / T) over T > 0 (Guo et al., 2017)."""
    logits = logits.clone()  # may come from inference_mode; autograd needs a normal tensor
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    loss_fn = torch.nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = loss_fn(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().clamp(0.05, 20.0))


def check_parity(eager: torch.nn.Module, scripted: torch.jit.ScriptModule, x: torch.Tensor) -> float:
    """Largest difference between the eager and the scripted model: logits, and the embedding where offered."""
    with torch.inference_mode():
        diff = (eager(x) - scripted(x)).abs().max().item()
        if hasattr(eager, "forward_features"):
            mine, theirs = eager.forward_features(x), scripted.forward_features(x)
            diff = max(diff, *((a - b).abs().max().item() for a, b in zip(mine, theirs)))
    if not diff < PARITY_TOLERANCE:
        raise ExportRefused(f"scripted model differs from eager model by {diff:.3g} (tolerance {PARITY_TOLERANCE})")
    return diff


def check_not_collapsed(preds: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """Refuse a model that predicts only a few classes, or one class far more than it occurs."""
    pred_share = np.bincount(preds, minlength=k) / len(preds)
    true_share = np.bincount(labels, minlength=k) / len(labels)
    present = true_share > 0
    missing = [int(c) for c in np.flatnonzero(present & (pred_share == 0))]
    worst = int(np.argmax(pred_share))
    if missing or pred_share[worst] > 2.5 * max(true_share.max(), 1.0 / k):
        raise ExportRefused(
            f"predictions are collapsed: class {worst} gets {pred_share[worst]:.0%} of held-out predictions "
            f"(it is {true_share[worst]:.0%} of the labels); classes never predicted: {missing}"
        )
    return {"predicted_share": pred_share.round(4).tolist(), "true_share": true_share.round(4).tolist()}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return ece


def reference_stats(model, x: torch.Tensor, labels: torch.Tensor, spec: ModelSpec, ood_params: dict | None = None,
                    signals: torch.Tensor | None = None) -> dict:
    """Held-out label/confidence/out-of-distribution distributions as served (the spec's TTA policy), plus accuracy."""
    policy = Policy.from_spec(spec, ood_params)
    served = classify(model, x, torch.ones(len(x), dtype=torch.bool), policy, signals)
    with_tta = served.probs
    without = classify(model, x, torch.zeros(len(x), dtype=torch.bool), policy).probs
    conf, pred = with_tta.max(dim=1)
    return {
        "n": len(labels),
        "policy": {"tta": list(spec.tta), "merge": spec.merge, "temperature": spec.temperature},
        "label_distribution": dict(zip(spec.class_names, (np.bincount(pred.numpy(), minlength=spec.num_classes) / len(pred)).round(5).tolist())),
        "confidences": [round(float(c), 4) for c in sorted(conf.tolist())],
        "uncertain_rate": round(float((conf < spec.threshold).float().mean()), 5),
        "accuracy_tta": round(float((pred == labels).float().mean()), 5),
        "accuracy_no_tta": round(float((without.argmax(1) == labels).float().mean()), 5),
        "ece_tta": round(expected_calibration_error(with_tta, labels), 5),
        "ece_no_tta": round(expected_calibration_error(without, labels), 5),
        "ood_rate": None if served.ood is None else round(float(served.ood.float().mean()), 5),
    }


def features_of(model, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embedding) from ``forward_features``, in batches."""
    with torch.inference_mode():
        outs = [model.forward_features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def photographed(images: np.ndarray, seed: int) -> list:
    """Every garment rendered once in every catalogue style (``scripts.train.photos``)."""
    return [photo for style in STYLES for photo in render_all(images, style, seed)]


def fit_ood(model, spec: ModelSpec, ckpt: dict, false_alarm_rate: float, seed: int) -> tuple[OODSpec, dict, dict]:
    """Fit the features detector (``scripts.train.ood``) and set its threshold on the calibration split."""
    rng = np.random.default_rng(seed)
    train_images, train_labels = ckpt["train"]
    photos = [render_photo(g, STYLES[int(rng.integers(len(STYLES)))], rng) for g in train_images]
    outliers = ood.synthetic_outliers(train_images, rng, render_photo, STYLES)
    sets = {}
    for name, images in (("native", train_images), ("photos", photos), ("outliers", outliers)):
        x, signals = eval_inputs(images, spec)
        sets[name] = (*features_of(model, x), signals)
    inside = tuple(torch.cat([a, b]) for a, b in zip(sets["native"], sets["photos"]))
    labels = torch.from_numpy(np.concatenate([train_labels, train_labels]))
    widths = tuple(ckpt["model_args"].get("widths", (32, 64, 128)))
    layers = ood.fit_layers(inside[1], labels, ood.layer_slices(widths, 128), spec.num_classes)
    detector = ood.fit_detector(spec.temperature, layers, inside, sets["outliers"])

    cal_images, _ = ckpt["calib"]
    scores = {}
    for name, images in (("native", cal_images), ("photos", photographed(cal_images, seed))):
        x, signals = eval_inputs(images, spec)
        scores[name] = detector.score(detector.parts(*features_of(model, x), signals))
    # One threshold that flags at most false_alarm_rate of native and of photographed calibration garments.
    threshold = max(ood.threshold_at(scores["native"], false_alarm_rate), ood.threshold_at(scores["photos"], false_alarm_rate))
    summary = {name: round(float((s > threshold).float().mean()), 4) for name, s in scores.items()}
    return OODSpec("features", round(threshold, 5), false_alarm_rate), detector.to_params(), summary


def choose_threshold(confidence: torch.Tensor, wrong: torch.Tensor, ood_flag: torch.Tensor, target: float) -> float:
    """The lowest "uncertain" threshold at which at most ``target`` of the answers are confidently wrong
    (wrong, confidence >= threshold and not out of distribution)."""
    candidates = torch.cat([torch.tensor([0.5]), confidence[confidence > 0.5].sort().values])
    for t in candidates.tolist():
        if float((wrong & (confidence >= t) & ~ood_flag).float().mean()) <= target:
            return round(t, 4)
    return 1.0


def golden_inputs(model, spec: ModelSpec, ood_params: dict, images: np.ndarray, seed: int) -> list[dict]:
    """A native image, a catalogue-style photo and a non-garment, each far from every threshold."""
    policy = Policy.from_spec(spec, ood_params)
    rng = np.random.default_rng(seed)
    candidates = {
        "native": [Image.fromarray(g) for g in images[:40]],
        "catalogue_photo": render_all(images[:40], "catalogue_white", seed),
        "not_a_garment": [ood.synthetic_outlier(images, i, "patch_shuffled", rng) for i in range(40)],
    }
    out = []
    for name, pictures in candidates.items():
        best, best_margin = None, -1.0
        for picture in pictures:
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            data = buffer.getvalue()
            body = golden.answer_bytes(data, model, spec, policy)
            flagged = name == "not_a_garment"
            if body["out_of_distribution"] != flagged:
                continue
            margin = abs(body["ood_score"] - spec.ood.threshold) + (0 if flagged else body["confidence"])
            if margin > best_margin:
                best, best_margin = {"name": name, "image": base64.b64encode(data).decode(), "expected": golden.expected(body)}, margin
        if best is None:
            raise ExportRefused(f"no {name} candidate is answered as expected; the model or detector is not fit to serve")
        out.append(best)
    return out


def main(args: argparse.Namespace) -> dict:
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec = ModelSpec.from_dict(ckpt["spec"])
    overrides = {"name": args.name}
    if args.tta:
        overrides["tta"] = split_views(args.tta)
    if args.merge:
        overrides["merge"] = args.merge
    spec = spec.with_overrides(overrides)

    eager = FashionCNN(**ckpt["model_args"])
    eager.load_state_dict(ckpt["state_dict"])
    eager.eval()
    scripted = torch.jit.script(eager)
    scripted.eval()

    hold_images, hold_labels = ckpt["holdout"]
    cal_images, cal_labels = ckpt["calib"]
    x_hold, s_hold = eval_inputs(hold_images, spec)
    y_hold = torch.from_numpy(hold_labels)
    # Calibration: the native images and the same garments photographed, as the server sees them.
    x_cal, s_cal = eval_inputs(list(cal_images) + photographed(cal_images, args.seed), spec)
    y_cal = torch.from_numpy(np.tile(cal_labels, 1 + len(STYLES)))

    diff = check_parity(eager, scripted, x_hold[:256])
    temperature = fit_temperature(predict_logits(scripted, x_cal), y_cal)
    spec = dataclasses.replace(spec, temperature=round(temperature, 4))
    ood_params, ood_summary = None, {}
    if spec.canonical is not None and "train" in ckpt:
        ood_spec, ood_params, ood_summary = fit_ood(scripted, spec, ckpt, args.false_alarm_rate, args.seed)
        spec = dataclasses.replace(spec, ood=ood_spec)
    if args.threshold is not None:
        spec = dataclasses.replace(spec, threshold=args.threshold)
    else:  # risk control on the calibration split, as served (TTA on)
        served = classify(scripted, x_cal, torch.ones(len(x_cal), dtype=torch.bool), Policy.from_spec(spec, ood_params), s_cal)
        confidence, predicted = served.probs.max(dim=1)
        flagged = served.ood if served.ood is not None else torch.zeros(len(x_cal), dtype=torch.bool)
        spec = dataclasses.replace(spec, threshold=choose_threshold(confidence, predicted != y_cal, flagged,
                                                                     args.max_confidently_wrong))
    reference = reference_stats(scripted, x_hold, y_hold, spec, ood_params, s_hold)
    collapse = check_not_collapsed(predict_logits(scripted, x_hold).argmax(1).numpy(), hold_labels, spec.num_classes)
    reference["collapse_check"] = collapse
    reference["parity_max_abs_diff"] = diff
    reference["ood_calibration_flagged"] = ood_summary
    extra = {SPEC_FILENAME: spec.to_json(), REFERENCE_FILENAME: json.dumps(reference)}
    if ood_params is not None:
        extra[OOD_FILENAME] = json.dumps(ood_params, separators=(",", ":"))
        extra[GOLDEN_FILENAME] = json.dumps(golden_inputs(scripted, spec, ood_params, hold_images, args.seed))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(args.out), _extra_files=extra)
    size_kib = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({size_kib:.0f} KiB): parity max|diff| {diff:.2e}, temperature {spec.temperature}, "
          f"uncertain below {spec.threshold}")
    print(
        f"held-out (n={reference['n']}): accuracy {reference['accuracy_no_tta']:.4f} without TTA, "
        f"{reference['accuracy_tta']:.4f} with {list(spec.tta)}; ECE {reference['ece_no_tta']:.4f} / "
        f"{reference['ece_tta']:.4f}; uncertain {reference['uncertain_rate']:.1%}; "
        f"out of distribution {reference['ood_rate']}"
    )
    if ood_params is not None:
        print(f"OOD threshold {spec.ood.threshold} (flags {ood_summary} of the calibration split)")
    return reference


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ExportRefused as exc:
        sys.exit(f"export refused: {exc}")
