"""Compare out-of-distribution scores, per non-garment set: AUROC and FPR at 95 % TPR.

    python -m scripts.evaluate.ood_compare          # writes docs/ood_comparison.md (+ .json)

In distribution: the held-out garments, native and rendered in every catalogue style
(seed 0).  Out of distribution: the sets of scripts.evaluate.outliers (seed 0).  Every
image goes through the handler's preprocessing (``image_to_input``) and the shipped
model's ``forward_features``; the scores compared are the single parts the shipped
detector combines (maximum softmax probability is added as the classic baseline) and
the shipped combination itself.  FPR at 95 % TPR: the share of in-distribution images
flagged when the threshold flags 95 % of that set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handler.loader import read_model
from handler.ood import Detector
from scripts.evaluate.outliers import non_garment_sets
from scripts.train.data import DEFAULT_DATA, REPO, eval_inputs, load_idx_dir, split
from scripts.train.export import features_of
from scripts.train.ood import auroc, fpr_at_tpr
from scripts.train.photos import STYLES, render_all


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model-file", type=Path, default=REPO / "models" / "fashion_cnn.pt")
    p.add_argument("--per-set", type=int, default=200)
    p.add_argument("--out-md", type=Path, default=REPO / "docs" / "ood_comparison.md")
    p.add_argument("--out-json", type=Path, default=REPO / "docs" / "ood_comparison.json")
    return p


def scores(model, detector: Detector, images, spec) -> dict[str, torch.Tensor]:
    x, signals = eval_inputs(images, spec)
    logits, embedding = features_of(model, x)
    parts = detector.parts(logits, embedding, signals)
    layers = [name for name in parts if name.startswith("mahalanobis_")]
    out = {
        "max softmax probability (negated)": -torch.softmax(logits / spec.temperature, dim=1).max(dim=1).values,
        "energy": parts["energy"],
        "Mahalanobis, penultimate layer": parts["mahalanobis_penultimate"],
        "Mahalanobis, sum over layers": sum(parts[name] for name in layers),
        "image signals only (border uniformity, negated)": -parts["border_uniformity"],
        "shipped detector (all parts, logistic)": detector.score(parts),
    }
    return out


def main(args: argparse.Namespace) -> dict:
    artifact = read_model(args.model_file)
    model, spec = artifact.model.eval(), artifact.spec
    detector = Detector.build(spec.ood, spec.temperature, artifact.ood)
    ds = load_idx_dir(args.data)
    held = ds.images[split(ds, seed=0).holdout]
    inside_images = [Image.fromarray(g) for g in held] + [p for s in STYLES for p in render_all(held, s, seed=0)]
    inside = scores(model, detector, inside_images, spec)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, images in non_garment_sets(args.per_set, seed=0).items():
        outside = scores(model, detector, images, spec)
        table[name] = {k: {"auroc": auroc(inside[k], outside[k]), "fpr95": fpr_at_tpr(inside[k], outside[k])}
                       for k in inside}
    methods = list(inside)
    lines = ["| score | " + " | ".join(table) + " | mean |", "|---|" + "---|" * (len(table) + 1)]
    for metric, label in (("auroc", "AUROC"), ("fpr95", "FPR at 95 % TPR")):
        lines.append(f"| **{label}** |" + " |" * (len(table) + 1))
        for m in methods:
            values = [table[s][m][metric] for s in table]
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
    md = (f"In distribution: {len(inside_images)} held-out garments (native and {len(STYLES)} catalogue styles); "
          f"out of distribution: {args.per_set} images per set. Model: `{args.model_file.name}`. "
          "Reproduce: `python -m scripts.evaluate.ood_compare`.\n\n" + "\n".join(lines) + "\n")
    args.out_md.write_text(md)
    args.out_json.write_text(json.dumps(table, indent=2) + "\n")
    print(md)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
