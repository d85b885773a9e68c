"""Re-answer an exported model's golden inputs after a deliberate change to the preprocessing.

    python -m scripts.train.regolden                          # models/fashion_cnn.pt and its int8 variant
    python -m scripts.train.regolden --check                  # measure and compare only; write nothing

Every worker refuses to start when the golden inputs stored in the model (``handler.golden``)
are not answered as at export: a changed decoder, resampler or library is caught before a user
sees it.  When the change is deliberate (a faster decode path, a library upgrade that was
reviewed), this re-measures the model on the held-out split as the server now sees it (native
and every catalogue style, TTA off and as served, fp32 and int8: ``scripts.train.quantize.evaluate``)
and refuses, writing nothing, unless every accuracy is within ``--max-drop`` points of the figures
recorded at export (``quantization.json``) and the int8 model still meets its thresholds.  Then it
picks the golden inputs again (``scripts.train.export.golden_inputs``), stores them with their new
answers in both files, and records the re-measured figures; every other extra file is kept as it is.
Retraining (``make train``) does all of this too, from a checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from handler.loader import EXTRA_FILES, GOLDEN_FILENAME, QUANTIZATION_FILENAME, int8_path, read_extra_file, read_model
from scripts.train import ood, quantize
from scripts.train.data import DEFAULT_DATA, REPO, eval_inputs, load_idx_dir, split
from scripts.train.export import ExportRefused, drops, golden_inputs, photographed
from scripts.train.photos import STYLES, render_photo_bytes


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "fashion_cnn.pt")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the IDX folder the model was trained on")
    p.add_argument("--seed", type=int, default=0, help="the split and render seed the export used")
    p.add_argument("--max-drop", type=float, default=0.3,
                   help="refuse when any held-out accuracy (percent) is more than this below the recorded figure")
    p.add_argument("--check", action="store_true", help="measure and compare only; write nothing")
    return p


def _load(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """A TorchScript file and every extra file it carries (as text)."""
    names = [*EXTRA_FILES, QUANTIZATION_FILENAME]
    extra = dict.fromkeys(names, "")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return model, {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items() if v}


def main(args: argparse.Namespace) -> dict:
    target = int8_path(args.model)
    info = json.loads(read_extra_file(target, QUANTIZATION_FILENAME) or "{}")
    if not info.get("figures"):
        raise ExportRefused(f"{target} carries no {QUANTIZATION_FILENAME} figures to compare with; retrain instead")
    torch.backends.quantized.engine = info.get("engine", quantize.ENGINE)
    fp32 = read_model(args.model, sidecars=False)
    int8 = read_model(target, sidecars=False)
    spec, ood_params = fp32.spec, fp32.ood

    ds = load_idx_dir(args.data)
    held = split(ds, seed=args.seed).holdout
    hold_images, hold_labels = ds.images[held], ds.labels[held]
    rng = np.random.default_rng(args.seed)
    sets = {"native": (*eval_inputs(hold_images, spec), hold_labels),
            "photos": (*eval_inputs(photographed(hold_images, args.seed), spec), np.tile(hold_labels, len(STYLES)))}
    if ood_params is not None:
        sets["outliers"] = (*eval_inputs(ood.synthetic_outliers(hold_images, rng, render_photo_bytes, STYLES), spec), None)
    figures = quantize.evaluate(fp32.model, int8.model, sets, spec, ood_params)
    print("\n".join(quantize.summary_lines(figures)))
    problems = drops(info["figures"], figures, args.max_drop)
    problems += quantize.shortfalls(figures, quantize.Thresholds(**info.get("thresholds", {})))
    if problems:
        raise ExportRefused("the model answers the held-out split worse than at export under the current "
                            "preprocessing, so its golden inputs were not re-made: " + "; ".join(problems))
    if args.check:
        print("check only: nothing written")
        return figures

    fp32_golden = golden_inputs(fp32.model, spec, ood_params, hold_images, args.seed)
    int8_golden = golden_inputs(int8.model, spec, ood_params, hold_images, args.seed)
    info["figures"] = figures
    info["remeasured"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                          "by": "scripts.train.regolden (preprocessing changed; golden inputs re-made)"}
    for path, golden in ((args.model, fp32_golden), (target, int8_golden)):
        model, extra = _load(path)
        extra[GOLDEN_FILENAME] = json.dumps(golden)
        if path == target:
            extra[QUANTIZATION_FILENAME] = json.dumps(info, indent=1)
        buffer = io.BytesIO()
        torch.jit.save(model, buffer, _extra_files=extra)
        path.write_bytes(buffer.getvalue())
        print(f"rewrote {path}: {GOLDEN_FILENAME} ({', '.join(g['name'] for g in golden)})"
              + (f" and {QUANTIZATION_FILENAME}'s figures" if path == target else ""))
    return figures


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ExportRefused as exc:
        sys.exit(f"regolden refused: {exc}")
