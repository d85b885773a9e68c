"""How small may an upload be decoded? The margin behind ``canonical.decode_size`` and ``DECODE_MARGIN``.

    python -m scripts.evaluate.decode_scale          # docs/decode_scale.md and docs/decode_scale.json

``handler.decode`` decodes a JPEG with DCT scaling (1/2, 1/4, 1/8) and reduces other formats by an
integer factor, keeping a side at least as large as the next stage needs (``handler.preprocess.need``).
This measures, for several such minimums, how far the answers move from a decode of every pixel:

- canonicalising specs (fashion_cnn): the long side kept (``canonical.decode_size``; below 256 the
  analysis copy shrinks with it), on held-out
  garments as catalogue photos (every style) and as phone photos (``scripts.train.scenes``: plain
  backdrops and textured flat lays, 2000-4032 px): label agreement with the full decode, the mean and
  largest change of confidence, the mean absolute difference of the canonical 28x28 (grey levels);
- resizing specs (a ResNet-style ``crop`` spec, 256 then 224): the margin over ``resize_size``
  (``DECODE_MARGIN``), on the same phone photos and scikit-learn's two bundled JPEG photos upscaled:
  the mean absolute difference of the 224x224 input (grey levels);

and the preprocessing time per image at each setting (one thread, median). The held-out split and the
scenes are never used to train or fit anything here.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from handler import preprocess
from handler.decode import FULL, Need
from handler.inference import Policy, classify
from handler.loader import read_model
from handler.preprocess import bytes_to_input, canonical_image, decode_image, to_tensor
from scripts.train.build_resnet import resnet_spec
from scripts.train.data import DEFAULT_DATA, REPO, load_idx_dir, split
from scripts.train.photos import STYLES, render_all
from scripts.train.scenes import render_scenes

DOCS = REPO / "docs"
SIZES = (128, 192, 256, 384, 512)  # canonical.decode_size candidates
MARGINS = (1.0, 1.5, 2.0, 3.0)  # DECODE_MARGIN candidates


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", type=Path, default=REPO / "models" / "fashion_cnn.pt")
    p.add_argument("--photos", type=int, default=60, help="held-out garments per catalogue style")
    p.add_argument("--scenes", type=int, default=24, help="phone photos per kind (plain, flat_lay)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--json", type=Path, default=DOCS / "decode_scale.json")
    p.add_argument("--markdown", type=Path, default=DOCS / "decode_scale.md")
    return p


def median_ms(fn, data: list[bytes]) -> float:
    times = []
    for d in data:
        t0 = time.perf_counter()
        fn(d)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def canonical_rows(sets: dict[str, list[bytes]], model, spec, policy) -> list[dict]:
    rows = []
    for name, payloads in sets.items():
        full = [canonical_image(decode_image(d, spec.limits, FULL), spec).image for d in tqdm(payloads, desc=f"{name} full", leave=False)]
        full_answers = _answers(model, full, spec, policy)
        for size in (*SIZES, None):
            # Below the analysis size, the analysis (the mask) runs at that size too.
            s = spec if size is None else dataclasses.replace(spec, canonical=dataclasses.replace(
                spec.canonical, decode_size=size, analysis_size=min(spec.canonical.analysis_size, size)))
            need = FULL if size is None else preprocess.need(s)
            images = [canonical_image(decode_image(d, s.limits, need), s).image for d in payloads]
            answers = _answers(model, images, s, policy)
            same = float(np.mean([a == b for a, b in zip(answers[0], full_answers[0])]))
            gap = np.abs(answers[1] - full_answers[1])
            diff = float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(images, full)]))
            ms = median_ms(lambda d, s=s: bytes_to_input(d, s), payloads) if size is not None else median_ms(
                lambda d: preprocess._input(preprocess._canonical(decode_image(d, spec.limits, FULL), spec), spec), payloads)
            rows.append({"set": name, "n": len(payloads), "decode_size": size, "same_label": same,
                         "confidence_change_mean": float(gap.mean()), "confidence_change_max": float(gap.max()),
                         "canonical_diff": diff, "ms": ms})
    return rows


def _answers(model, images, spec, policy) -> tuple[list[int], np.ndarray]:
    x = torch.stack([to_tensor(img, spec) for img in images])
    probs = classify(model, x, torch.zeros(len(x), dtype=torch.bool), policy).probs
    conf, label = probs.max(dim=1)
    return label.tolist(), conf.numpy()


def crop_rows(sets: dict[str, list[bytes]]) -> list[dict]:
    spec = resnet_spec(classes=10)
    rows = []
    for name, payloads in sets.items():
        full = [preprocess.resize(decode_image(d, spec.limits, FULL, spec.background).convert("RGB"), spec) for d in payloads]
        for margin in (*MARGINS, None):
            need = FULL if margin is None else Need(short=int(np.ceil(spec.resize_size * margin)))
            images = [preprocess.resize(decode_image(d, spec.limits, need, spec.background).convert("RGB"), spec)
                      for d in payloads]
            diff = float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(images, full)]))
            worst = float(max(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(images, full)))
            ms = median_ms(lambda d, n=need: to_tensor(preprocess.resize(decode_image(d, spec.limits, n, spec.background)
                                                                         .convert("RGB"), spec), spec), payloads)
            rows.append({"set": name, "n": len(payloads), "margin": margin, "input_diff_mean": diff,
                         "input_diff_worst": worst, "ms": ms})
    return rows


def conclusion(result: dict) -> str:
    """What the shipped settings measured, in words, from the rows."""
    size, margin = result["shipped"]["decode_size"], result["shipped"]["decode_margin"]
    parts = []
    for r in result["canonical"]:
        if r["decode_size"] == size:
            full = next(f for f in result["canonical"] if f["set"] == r["set"] and f["decode_size"] is None)
            parts.append(f"{r['set']}: {r['same_label']:.1%} of labels as with every pixel, confidence within "
                         f"{r['confidence_change_mean']:.3f} on average, {r['ms']:.1f} ms instead of {full['ms']:.1f}")
    crops = [f"{r['set']}: {r['input_diff_mean']:.2f} grey levels from the full decode's input on average "
             f"({r['ms']:.1f} ms)" for r in result["crop"] if r["margin"] == margin]
    return (f"`canonical.decode_size` = {size} (a 4000x3000 JPEG decodes at 1/8, 500x375): " + "; ".join(parts) + ". "
            "On textured flat lays every reduced size moves about as many labels: canonicalisation itself is unstable "
            "on texture there (the background model of docs/real-world.md), whatever the decode. "
            f"`DECODE_MARGIN` = {margin:g} (the resize to `resize_size` starts from at least {margin:g}x its size): "
            + "; ".join(crops) + ", below a JPEG's own quantisation noise.")


def markdown(result: dict) -> str:
    lines = ["# Decoding at the scale the model needs", "",
             "Generated by `python -m scripts.evaluate.decode_scale` ([decode_scale.json](decode_scale.json)); "
             f"{result['date']}, one thread. Every figure compares a reduced decode with a decode of every pixel "
             "of the same file (`handler/decode.py`).", "",
             "## Canonicalising specs (fashion_cnn): `canonical.decode_size`", "",
             "| set | n | decode_size | same label | confidence change, mean / max | canonical 28x28 diff (levels) | ms per image |",
             "|---|---|---|---|---|---|---|"]
    for r in result["canonical"]:
        size = "every pixel" if r["decode_size"] is None else str(r["decode_size"])
        lines.append(f"| {r['set']} | {r['n']} | {size} | {r['same_label']:.1%} | {r['confidence_change_mean']:.4f} / "
                     f"{r['confidence_change_max']:.3f} | {r['canonical_diff']:.2f} | {r['ms']:.1f} |")
    lines += ["", "## Resizing specs (ResNet-style `crop`, 256 then 224): `DECODE_MARGIN`", "",
              "| set | n | margin over resize_size | 224x224 input diff, mean / worst image (levels) | ms per image |",
              "|---|---|---|---|---|"]
    for r in result["crop"]:
        margin = "every pixel" if r["margin"] is None else f"{r['margin']:g}x"
        lines.append(f"| {r['set']} | {r['n']} | {margin} | {r['input_diff_mean']:.2f} / {r['input_diff_worst']:.2f} | "
                     f"{r['ms']:.1f} |")
    lines += ["", "## What is shipped", "", result["conclusion"], ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    artifact = read_model(args.model)
    model, spec = artifact.model.eval(), artifact.spec
    policy = Policy.from_spec(spec, artifact.ood)
    ds = load_idx_dir(args.data)
    held = split(ds, seed=0).holdout
    garments = ds.images[held]
    catalogue = [p for style in STYLES for p in render_all(garments[: args.photos], style, args.seed, as_bytes=True)]
    scenes = {kind: [s.data for s in tqdm(render_scenes(garments[: args.scenes], kind, args.seed), desc=kind, leave=False)]
              for kind in ("plain", "flat_lay")}
    canonical = canonical_rows({"catalogue photos (5 styles)": catalogue, "phone, plain backdrop": scenes["plain"],
                                "phone, textured flat lay": scenes["flat_lay"]}, model, spec, policy)
    import sklearn.datasets

    natural = []
    for image in sklearn.datasets.load_sample_images().images:  # china.jpg and flower.jpg, 640x427
        big = Image.fromarray(image).resize((2560, 1708), Image.LANCZOS)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=90)
        natural.append(buffer.getvalue())
    crop = crop_rows({"phone photos (plain and flat lay)": scenes["plain"] + scenes["flat_lay"],
                      "scikit-learn photos, 4x upscaled": natural})
    shipped = {"decode_size": spec.canonical.decode_size, "decode_margin": preprocess.DECODE_MARGIN}
    result = {"date": time.strftime("%Y-%m-%d"), "shipped": shipped, "canonical": canonical, "crop": crop}
    result["conclusion"] = conclusion(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.markdown.write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
