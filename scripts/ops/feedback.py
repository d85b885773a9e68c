"""Labelled accuracy against the held-out reference: the test ``ctl feedback`` and the LabelledAccuracyLow alert share.

Labels come mostly from the review queue, which is rich in uncertain answers, so the raw labelled accuracy would
be sunk by it (and flattered by a queue of confident answers). Answers are therefore judged per flag against the
held-out accuracy of answers with the same flag:

- ``confident`` (neither uncertain nor out of distribution) and ``uncertain`` (uncertain, in distribution) are
  tested together: under the reference, the number right among n_s labelled answers of flag s is binomial with
  p_s (the held-out split's accuracy for that flag), so the expected number right is E = sum n_s p_s with variance
  V = sum n_s p_s (1 - p_s); the labelled accuracy is significantly below the reference when
  z = (E - correct) / sqrt(V) >= ``Z`` (one-sided; 3.09 is a 1-in-1000 false alarm);
- ``out_of_distribution`` answers are reported apart and not tested (their label says what the thing was, often
  "not a garment"; the held-out split has few of them).

With fewer than ``MIN_EXPECTED_ERRORS`` wrong answers expected under the reference (E's complement) there is no
verdict (INSUFFICIENT): the normal approximation needs them, and a handful of labels proves nothing.

``reference_accuracy`` measures the p_s: the served model (its precision and serving policy from
model-config.yaml) on the held-out split of the training data (the split ``scripts.train.train`` held out, seed 0),
by the handler's own ``classify``. ``python -m scripts.ops.alerts`` writes it to
deploy/monitoring/feedback_reference.json, which ``ctl feedback`` reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from handler.record import FLAGS

TESTED = ("confident", "uncertain")
Z = 3.09  # one-sided, alpha = 0.001
MIN_EXPECTED_ERRORS = 10


def wilson(correct: int, n: int, z: float = 1.959964) -> list[float] | None:
    """The Wilson score interval (95 % by default) of a proportion; None without samples."""
    if n <= 0:
        return None
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def counts_by_flag(version_summary: dict) -> dict[str, tuple[int, int]]:
    """(labelled, correct) per flag from one version of the recorder's summary."""
    return {f: (int(v["labelled"]), int(v["correct"])) for f, v in version_summary.get("by_flag", {}).items()}


def test(by_flag: dict[str, tuple[int, int]], reference: dict[str, float], z: float = Z,
         min_expected_errors: float = MIN_EXPECTED_ERRORS) -> dict:
    """The verdict on labelled answers of the tested flags: BELOW (significantly below the reference), OK, INSUFFICIENT."""
    n = sum(by_flag.get(f, (0, 0))[0] for f in TESTED if f in reference)
    correct = sum(by_flag.get(f, (0, 0))[1] for f in TESTED if f in reference)
    expected = sum(by_flag.get(f, (0, 0))[0] * reference[f] for f in TESTED if f in reference)
    variance = sum(by_flag.get(f, (0, 0))[0] * reference[f] * (1 - reference[f]) for f in TESTED if f in reference)
    errors_expected = n - expected
    score = (expected - correct) / math.sqrt(variance) if variance > 0 else 0.0
    if errors_expected < min_expected_errors:
        verdict = "INSUFFICIENT"
    else:
        verdict = "BELOW" if score >= z else "OK"
    return {"verdict": verdict, "labelled": n, "correct": correct, "expected_correct": round(expected, 3),
            "expected_accuracy": round(expected / n, 4) if n else None,
            "accuracy": round(correct / n, 4) if n else None, "z": round(score, 3), "z_alert": z,
            "expected_errors": round(errors_expected, 2), "min_expected_errors": min_expected_errors}


# --- the reference -------------------------------------------------------------------------------------------------
def served(model_path: Path, model_config: Path):
    """(model, spec, ood parameters, precision) as a worker serves them: the handler's overrides and precision."""
    import yaml

    from handler.loader import int8_path, read_int8, read_model

    artifact = read_model(Path(model_path))
    settings = dict((yaml.safe_load(Path(model_config).read_text()) or {}).get("handler") or {})
    precision = settings.pop("precision", "fp32")
    for key in ("threads", "optimize"):
        settings.pop(key, None)
    spec = artifact.spec.with_overrides(settings)
    model = artifact.model.eval()
    if precision == "int8" and int8_path(Path(model_path)).is_file():
        model = read_int8(int8_path(Path(model_path)), artifact)[0].model.eval()
    else:
        precision = "fp32"
    return model, spec, artifact.ood, precision


def reference_accuracy(model_path: Path, model_config: Path, data: Path | None = None, seed: int = 0) -> dict:
    """The served model's held-out accuracy per flag (and overall), as the alert and ``ctl feedback`` use it."""
    import torch

    from handler.inference import Policy, classify
    from scripts.train.data import DEFAULT_DATA, eval_inputs, load_dataset, split

    model, spec, ood, precision = served(model_path, model_config)
    data = Path(data or DEFAULT_DATA)
    dataset = load_dataset(data, spec)
    held = split(dataset, seed=seed).holdout
    x, signals = eval_inputs(dataset.images[held], spec)
    labels = torch.from_numpy(dataset.labels[held])
    policy = Policy.from_spec(spec, ood)
    result = classify(model, x, torch.ones(len(x), dtype=torch.bool), policy, signals)
    confidence, predicted = result.probs.max(dim=1)
    ood_flags = result.ood if result.ood is not None else torch.zeros(len(x), dtype=torch.bool)
    uncertain = (confidence < spec.threshold) | ood_flags
    right = predicted == labels
    by_flag = {}
    for name in FLAGS:
        mask = ood_flags if name == "out_of_distribution" else (uncertain & ~ood_flags if name == "uncertain" else ~uncertain)
        n, c = int(mask.sum()), int(right[mask].sum())
        by_flag[name] = {"n": n, "correct": c, "accuracy": round(c / n, 6) if n else None}
    return {"model": spec.name, "precision": precision, "data": data.name, "split": f"held-out (seed {seed})",
            "n": len(labels), "correct": int(right.sum()), "accuracy": round(float(right.float().mean()), 6),
            "by_flag": by_flag}


def load_reference(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def reference_shares(reference: dict) -> dict[str, float]:
    """p_s per tested flag (a flag with no held-out answer has no reference and is not tested)."""
    return {f: reference["by_flag"][f]["accuracy"] for f in TESTED if reference["by_flag"].get(f, {}).get("accuracy") is not None}


# --- ctl feedback -----------------------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _interval(values) -> str:
    return "-" if not values else f"{100 * values[0]:.1f}-{100 * values[1]:.1f} %"


def report(summary: dict, reference: dict | None) -> dict:
    """The summary with, per version, the held-out reference per flag and the test's verdict."""
    shares = reference_shares(reference) if reference else {}
    out = {"model": summary["model"], "disputes": summary.get("disputes", 0), "reference": reference, "versions": {}}
    for version, v in summary["versions"].items():
        verdict = test(counts_by_flag(v), shares) if shares else {"verdict": "NO REFERENCE"}
        out["versions"][version] = {**v, "test": verdict}
    return out


def render(rep: dict) -> str:
    ref = rep.get("reference") or {}
    flags = ref.get("by_flag", {})
    lines = []
    if ref:
        lines.append(f"held-out reference: {ref.get('model')} ({ref.get('precision')}) on the {ref.get('n')}-image "
                     f"{ref.get('split')} split of {ref.get('data')}: {_pct(ref.get('accuracy'))} overall")
    for version, v in rep["versions"].items():
        lines.append(f"{rep['model']} {version}: {v['labelled']} labelled, {v['correct']} right: {_pct(v['accuracy'])} "
                     f"(95 % interval {_interval(v['interval'])}); {v.get('recorded', 0)} answers recorded")
        lines.append(f"  {'flag of the answer':<22}{'labelled':>9}{'right':>7}{'accuracy':>10}  {'95 % interval':<15}"
                     f"{'held-out':>9}")
        for name, f in v["by_flag"].items():
            held = flags.get(name, {}).get("accuracy")
            note = "" if name in TESTED else "  (reported apart, not tested)"
            lines.append(f"  {name:<22}{f['labelled']:>9}{f['correct']:>7}{_pct(f['accuracy']):>10}  "
                         f"{_interval(f['interval']):<15}{_pct(held):>9}{note}")
        t = v["test"]
        if t["verdict"] == "NO REFERENCE":
            lines.append("  test: no held-out reference (give --reference)")
        else:
            lines.append(f"  test (confident + uncertain, each flag against its held-out accuracy): {t['labelled']:g} "
                         f"labelled, {t['correct']:g} right, {t['expected_correct']:g} expected (z = {t['z']:.2f}; "
                         f"BELOW from {t['z_alert']:g}, with >= {t['min_expected_errors']:g} expected errors: "
                         f"{t['expected_errors']:g}) -> {t['verdict']}")
        labels = ", ".join(f"{name} {f['correct']}/{f['labelled']}" for name, f in v["by_label"].items())
        lines.append(f"  by the label given: {labels or 'none yet'}")
    lines.append(f"disputes (a later label refused because it disagreed with the first): {rep['disputes']}")
    return "\n".join(lines)


# --- ctl export-labelled ------------------------------------------------------------------------------------------
CLASSES_FILE = "classes.json"


def folder_name(index: int, name: str, width: int) -> str:
    """``00_T-shirt-top``: sorted folder names keep the class order; nothing a file system refuses."""
    safe = "".join(c if c.isalnum() or c in " ._-" else "-" for c in name).strip(" .") or "class"
    return f"{index:0{width}d}_{safe}"


def export_tree(items: list[dict], classes: list[str], out: Path, include_disputed: bool = False) -> dict:
    """Write labelled answers as ``out/<NN_class>/<request id>-<index>.png`` (the canonical input the model saw),
    ``classes.json`` (folder -> class name, in the model's order) and ``labels.jsonl``. "not a garment" and, unless
    asked, disputed labels are left out (counted)."""
    import base64

    width = len(str(max(len(classes) - 1, 0)))
    folders = {name: folder_name(i, name, width) for i, name in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    for folder in folders.values():
        (out / folder).mkdir(exist_ok=True)
    counts = {"written": 0, "not_a_garment": 0, "disputed": 0, "unknown_class": 0}
    with open(out / "labels.jsonl", "w") as meta:
        for it in items:
            if it["disputed"] and not include_disputed:
                counts["disputed"] += 1
                continue
            if it["class_index"] is None:
                counts["not_a_garment"] += 1
                continue
            if it["label"] not in folders:
                counts["unknown_class"] += 1
                continue
            rid = "".join(c if c.isalnum() or c in "._-" else "_" for c in it["request_id"])[:100]
            path = out / folders[it["label"]] / f"{rid}-{it['index']}.png"
            path.write_bytes(base64.b64decode(it["input_png"]))
            meta.write(json.dumps({"file": str(path.relative_to(out)), **{k: it[k] for k in (
                "request_id", "index", "label", "predicted", "flag", "version", "disputed")}}) + "\n")
            counts["written"] += 1
    (out / CLASSES_FILE).write_text(json.dumps({"classes": classes, "folders": {v: k for k, v in folders.items()}},
                                               indent=2) + "\n")
    return counts
