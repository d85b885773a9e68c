"""Export a training checkpoint to the served TorchScript file, with its spec and reference.

    python -m scripts.train.export                       # build/train/checkpoint.pt -> models/fashion_cnn.pt

The exporter refuses to write the artifact unless:
- the scripted model matches the eager model on a real held-out batch (max |diff| < 1e-5);
- its held-out predictions are not collapsed onto a few classes.
It fits a softmax temperature on the calibration split (never on the held-out
split) so that ``confidence`` means what it says, and stores the held-out label
and confidence distributions as the drift reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from handler.inference import Policy, classify
from handler.spec import REFERENCE_FILENAME, SPEC_FILENAME, ModelSpec
from handler.tta import split_views
from scripts.train.data import REPO, eval_tensors
from scripts.train.model import FashionCNN
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
    p.add_argument("--threshold", type=float, default=None, help="confidence below which answers are 'uncertain'")
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
    with torch.inference_mode():
        diff = (eager(x) - scripted(x)).abs().max().item()
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


def reference_stats(model, x: torch.Tensor, labels: torch.Tensor, spec: ModelSpec) -> dict:
    """Held-out label/confidence distributions as served (the spec's TTA policy), plus accuracy."""
    policy = Policy.from_spec(spec)
    with_tta = classify(model, x, torch.ones(len(x), dtype=torch.bool), policy).probs
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
    }


def main(args: argparse.Namespace) -> dict:
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec = ModelSpec.from_dict(ckpt["spec"])
    overrides = {"name": args.name}
    if args.tta:
        overrides["tta"] = split_views(args.tta)
    if args.merge:
        overrides["merge"] = args.merge
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    spec = spec.with_overrides(overrides)

    eager = FashionCNN(**ckpt["model_args"])
    eager.load_state_dict(ckpt["state_dict"])
    eager.eval()
    scripted = torch.jit.script(eager)
    scripted.eval()

    hold_images, hold_labels = ckpt["holdout"]
    cal_images, cal_labels = ckpt["calib"]
    x_hold, y_hold = eval_tensors(hold_images, spec), torch.from_numpy(hold_labels)
    x_cal, y_cal = eval_tensors(cal_images, spec), torch.from_numpy(cal_labels)

    diff = check_parity(eager, scripted, x_hold[:256])
    temperature = fit_temperature(predict_logits(scripted, x_cal), y_cal)
    spec = dataclasses.replace(spec, temperature=round(temperature, 4))
    reference = reference_stats(scripted, x_hold, y_hold, spec)
    collapse = check_not_collapsed(predict_logits(scripted, x_hold).argmax(1).numpy(), hold_labels, spec.num_classes)
    reference["collapse_check"] = collapse
    reference["parity_max_abs_diff"] = diff

    args.out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(args.out), _extra_files={SPEC_FILENAME: spec.to_json(), REFERENCE_FILENAME: json.dumps(reference)})
    size_kib = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({size_kib:.0f} KiB): parity max|diff| {diff:.2e}, temperature {spec.temperature}")
    print(
        f"held-out (n={reference['n']}): accuracy {reference['accuracy_no_tta']:.4f} without TTA, "
        f"{reference['accuracy_tta']:.4f} with {list(spec.tta)}; ECE {reference['ece_no_tta']:.4f} / "
        f"{reference['ece_tta']:.4f}; uncertain (< {spec.threshold}) {reference['uncertain_rate']:.1%}"
    )
    return reference


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ExportRefused as exc:
        sys.exit(f"export refused: {exc}")
