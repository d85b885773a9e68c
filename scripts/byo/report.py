"""The archive's report: ``build/NAME/report.{md,json}`` and its pictures (confusion matrix, reliability
before and after calibration, out-of-distribution scores), measured on the test part only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(path: Path, labels: np.ndarray, preds: np.ndarray, class_names, accuracy: float) -> None:
    """Rows: the classes the folder has; columns: the same, plus "other" for answers naming a class it has not."""
    present = [int(c) for c in np.unique(labels)]
    col = {c: i for i, c in enumerate(present)}
    other = any(int(p) not in col for p in preds)
    matrix = np.zeros((len(present), len(present) + other), dtype=int)
    for y, p in zip(labels, preds):
        matrix[col[int(y)], col.get(int(p), len(present))] += 1
    names = [str(class_names[c])[:14] for c in present]
    plt = _plt()
    side = min(12, 2.5 + 0.45 * len(present))
    fig, ax = plt.subplots(figsize=(side + 0.6 * other, side * 0.85))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    if len(present) <= 30:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if matrix[i, j]:
                    ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.6 else "black")
    ax.set_xticks(range(matrix.shape[1]), names + (["other"] if other else []), rotation=60, fontsize=7, ha="right")
    ax.set_yticks(range(len(present)), names, fontsize=7)
    ax.set_xlabel("answered (as served)")
    ax.set_ylabel("folder")
    ax.set_title(f"test part: accuracy {accuracy:.1%} (n = {len(labels)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10):
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    mids, accs, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            mids.append(float(conf[mask].mean()))
            accs.append(float(correct[mask].mean()))
            counts.append(int(mask.sum()))
    return mids, accs, counts


def reliability_png(path: Path, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
                    ece_before: float, ece_after: float, temperature: float) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharey=True)
    for ax, probs, title in ((axes[0], before, f"before (T = 1): ECE {ece_before:.1%}"),
                             (axes[1], after, f"after (T = {temperature:.3g}): ECE {ece_after:.1%}")):
        mids, accs, counts = _bins(probs, labels)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.scatter(mids, accs, s=[10 + 190 * c / max(counts) for c in counts], alpha=0.7)
        ax.plot(mids, accs, lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("accuracy (dot area: images)")
    fig.suptitle("reliability on the test part", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ood_png(path: Path, sets: dict[str, torch.Tensor], threshold: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    values = torch.cat(list(sets.values()))
    lo, hi = float(values.quantile(0.005)), float(values.quantile(0.995))
    edges = np.linspace(lo, hi, 50)
    for name, s in sets.items():
        ax.hist(s.clamp(lo, hi).numpy(), bins=edges, alpha=0.5, density=True, label=f"{name} (n = {len(s)})")
    ax.axvline(threshold, color="k", lw=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, " threshold", fontsize=8, va="top")
    ax.set_xlabel("ood_score (higher = less like your images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.1f} %"


def markdown(doc: dict) -> str:
    t, spec = doc["test"], doc["spec"]
    lines = [f"# {doc['name']}: archive report", "",
             f"Model `{doc['model']}`, images `{doc['data']}` ({doc['images']} images, {len(doc['classes_in_data'])} "
             f"classes); archive `{doc['archive']}`. Every figure below is measured on the **test part** "
             f"({doc['split']['test']} images), which nothing was fitted on.", ""]
    for w in doc["warnings"]:  # one quote each: they are separate findings
        lines += [f"> {w}", ""]
    lines += ["| | |", "|---|---|",
              f"| accuracy, as served | {_pct(t['accuracy'])} ({t['correct']} / {t['n']}); chance (the commonest class) {_pct(t['chance'])} |",
              f"| ECE before calibration (T = 1) | {_pct(t['ece_before'])} |",
              f"| ECE after calibration (T = {spec['temperature']}) | {_pct(t['ece_after'])} |",
              f"| uncertain (confidence < {spec['threshold']}) | {_pct(t['uncertain_rate'])} |",
              f"| confidently wrong (wrong, not uncertain, not flagged) | {_pct(t['confidently_wrong'])} |",
              f"| flagged out of distribution (false alarms) | {_pct(t['ood_rate'])} (threshold set for {_pct(spec['ood']['false_alarm_rate'])}) |",
              f"| synthetic outliers made from the test images, flagged | {_pct(t['synthetic_outliers_flagged'])} |"]
    for name, rate in doc.get("other_domains", {}).items():
        lines.append(f"| other domain `{name}` flagged ({rate['n']} images) | {_pct(rate['flagged'])} |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![reliability](reliability.png)", "",
              "![out-of-distribution scores](ood_scores.png)", "", "## The spec", "",
              f"{doc['spec_source']}", "", "```json", json.dumps(spec, indent=1), "```", ""]
    if doc.get("proposal"):
        p = doc["proposal"]
        lines += ["## How the spec was proposed", "",
                  f"Inputs the model runs on: {', '.join('x'.join(map(str, s)) for s in p['accepted_shapes'][:8])}. "
                  f"Polarity: {p['polarity']}. Classes: {'matched to the outputs by the answers' if p['class_order'] == 'matched' else 'the folders in natural order'}. "
                  f"Scored on {p['images']} images (negative log-likelihood after a fitted temperature; lower is better):", "",
                  "| size | resize | normalisation | variant | accuracy | NLL |", "|---|---|---|---|---|---|"]
        lines += [f"| {'x'.join(map(str, c['size']))} | {c['resize']} | {c['convention']} {c['mean']}/{c['std']} | "
                  f"{c['variant']} | {_pct(c['accuracy'])} | {c['nll']:.3f} |" for c in p["candidates"][:12]]
        lines += [""] + [f"- {n}" for n in p["notes"]] + [""]
    lines += ["## Doctor", "", "| check | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {v['check']} | {v['status']} | {v['summary']} |" for v in doc["doctor"]]
    d = doc["detector"]
    lines += ["", "## Out-of-distribution detector", "",
              f"Features: {d['features']['about']}. Fitted on {d['fit_images']} of your images and {d['outliers']} "
              f"synthetic outliers made from them ({', '.join(d['outlier_kinds'])}); Ledoit-Wolf shrinkage "
              f"{d['shrinkage']}; threshold {spec['ood']['threshold']} set on {d['tune_images']} other images at a "
              f"{_pct(spec['ood']['false_alarm_rate'])} false-alarm rate.", "",
              "## Golden inputs", "", "Checked by every worker at load (a changed decoder, resampler or model is refused):", ""]
    lines += [f"- `{g['name']}`: {g['expected']['label']}, out_of_distribution {g['expected']['out_of_distribution']}, "
              f"ood_score {g['expected']['ood_score']}" for g in doc["golden"]]
    lines += ["", f"Split (stratified, seed {doc['split']['seed']}): detector fit {doc['split']['fit']}, calibration "
              f"{doc['split']['fit'] + doc['split']['tune']} (temperature and the uncertain threshold; the detector's "
              f"threshold on its {doc['split']['tune']}), test {doc['split']['test']}. Took {doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)
