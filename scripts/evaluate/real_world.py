"""Real photos and things that are not garments, measured through the running server.

    make serve && make eval-real      # through HTTP: docs/real_world.json, docs/real_world_table.md, docs/real_world_grid.png
    python -m scripts.evaluate.real_world --offline --model-file old.pt   # the same sets in-process

Sets (nothing is downloaded):
- ``native``: the held-out split (scripts.train.data.split, seed 0) as PNG, as Fashion-MNIST has it;
- one set per catalogue style of ``scripts.train.photos`` (``catalogue_white``, ...): the same
  held-out garments rendered as shop photos (seed 0), sent as JPEG;
- one set per kind of phone photo of ``scripts.train.scenes`` (``scene_flat_lay``, ``scene_clutter``,
  ...): held-out garments in scenes drawn with the **eval** regime's parameters and seed 0 (training
  uses the train regime's, other seeds and other garments), sent as the JPEGs a phone makes
  (2000-4032 px for flat lays, plain photos and frame edges; EXIF orientation on a third of flat lays);
- non-garments from ``scripts.evaluate.outliers`` (digits, photos, faces, text, noise, shapes,
  MNIST-style 28x28 digits; 200 each, seed 0), built from data shipped inside installed packages.

Per set: accuracy, confidently wrong (wrong and neither uncertain nor out of distribution),
share flagged out of distribution, share uncertain, and the AUROC of ``ood_score`` against
the native held-out garments.  Every request goes through the inference API with the
shipped configuration (TTA as served).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from handler.inference import Policy, infer
from handler.loader import read_model
from handler.postprocess import render
from handler.preprocess import Prepared, bytes_to_canonical, prepare
from scripts.evaluate.http_accuracy import add_server_args, http_answers
from scripts.evaluate.outliers import NON_GARMENT_SETS, non_garment_sets
from scripts.ops.tsclient import TorchServeClient
from scripts.train.data import REPO, load_idx_dir, split
from scripts.train.ood import auroc
from scripts.train.photos import STYLES, render_all
from scripts.train.scenes import KINDS as SCENE_KINDS
from scripts.train.scenes import render_scenes

DOCS = REPO / "docs"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--per-set", type=int, default=200, help="images per non-garment set")
    p.add_argument("--limit", type=int, default=None, help="use only the first N held-out garments (a quick check)")
    p.add_argument("--scenes", type=int, default=200, help="held-out garments per kind of phone photo (0: none)")
    p.add_argument("--model-file", type=Path, default=REPO / "models" / "fashion_cnn.pt",
                   help="the model whose spec draws the grid (and that answers with --offline)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--grid", type=Path, default=None, help="write a picture: inputs -> what the model saw -> answer")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown")
    return p


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB" if fmt == "JPEG" else img.mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def build_sets(data: Path, per_set: int, limit: int | None = None, scenes: int = 0) -> dict[str, dict]:
    """{name: {"images": [PIL], "bytes": [bytes], "labels": array or None, "kind": garment|outlier}}."""
    ds = load_idx_dir(data)
    held = split(ds, seed=0).holdout[:limit]
    garments, labels = ds.images[held], ds.labels[held]
    sets = {"native": {"images": [Image.fromarray(g) for g in garments], "labels": labels, "kind": "native", "fmt": "PNG"}}
    for style in STYLES:
        sets[style] = {"images": render_all(garments, style, seed=0), "labels": labels, "kind": "photo", "fmt": "JPEG"}
    for kind in SCENE_KINDS if scenes else ():
        rendered = render_scenes(tqdm(garments[:scenes], desc=f"render {kind}", leave=False), kind, seed=0,
                                 regime_name="eval")
        sets[f"scene_{kind}"] = {"bytes": [s.data for s in rendered], "labels": labels[:scenes], "kind": "phone photo",
                                 "details": [s.detail for s in rendered]}
    for name, images in non_garment_sets(per_set, seed=0).items():
        sets[name] = {"images": images, "labels": None, "kind": "not a garment", "fmt": "PNG"}
    for entry in sets.values():
        if "bytes" not in entry:
            entry["bytes"] = [encode(img, entry["fmt"]) for img in entry["images"]]
    return sets


def thumbnail(entry: dict, i: int, side: int = 240) -> Image.Image:
    """Image ``i`` of a set as it is shown in the grid (scenes are decoded upright from their JPEG)."""
    if "images" in entry:
        return entry["images"][i]
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(entry["bytes"][i])))
    img.draft("RGB", (side, side))
    img = img.convert("RGB")
    img.thumbnail((side, side))
    return img


class Offline:
    """The handler's stages in-process, batched like TorchServe (prepare -> infer -> render)."""

    def __init__(self, model_file: Path, batch: int = 16):
        artifact = read_model(model_file)
        self.model, self.spec = artifact.model.eval(), artifact.spec
        self.policy = Policy.from_spec(self.spec, artifact.ood)
        self.batch = batch

    def answers(self, payloads: list[bytes], desc: str) -> list[dict]:
        out = []
        for i in tqdm(range(0, len(payloads), self.batch), desc=desc, leave=False):
            slots = [prepare({"body": data}, {}, self.spec) for data in payloads[i : i + self.batch]]
            for slot, result in zip(slots, infer(self.model, slots, self.policy)):
                if not isinstance(slot, Prepared):
                    raise RuntimeError(f"an evaluation image was refused: {slot}")
                out.append(render(slot, result, self.spec, self.policy.names, None)[2])
        return out


def summarise(answers: list[dict], labels, native_scores: list[float] | None) -> dict:
    ood = np.array([a.get("out_of_distribution", False) for a in answers])
    uncertain = np.array([a["uncertain"] for a in answers])
    row = {"n": len(answers), "flagged_ood": float(ood.mean()), "uncertain": float(uncertain.mean())}
    if labels is not None:
        correct = np.array([a["class_index"] for a in answers]) == labels
        row.update(accuracy=float(correct.mean()), confidently_wrong=float((~correct & ~uncertain & ~ood).mean()))
    scores = [a.get("ood_score") for a in answers]
    if native_scores is not None and None not in scores and None not in native_scores:
        row["auroc"] = auroc(torch.tensor(native_scores), torch.tensor(scores))
    return row


def grid(sets: dict, answers: dict, spec, path: Path, per_set: int = 2) -> None:
    """Rows of (input with the region the object was found in, canonical 28x28 the model saw, answer), a few per set."""
    cell, text_w = 120, 230
    rows = [(name, i) for name in sets for i in range(per_set)]
    cols = 2
    sheet = Image.new("RGB", (cols * (2 * cell + text_w + 20), (len(rows) + cols - 1) // cols * (cell + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, i) in enumerate(rows):
        x0, y0 = (k % cols) * (2 * cell + text_w + 20), (k // cols) * (cell + 8)
        img = thumbnail(sets[name], i).convert("RGB")
        scale = min(cell / img.width, cell / img.height)
        shown = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
        canonical = bytes_to_canonical(sets[name]["bytes"][i], spec)
        if canonical.region is not None:  # where canonicalisation found the object
            left, top, right, bottom = canonical.region
            bx, by = left * shown.width, top * shown.height
            ImageDraw.Draw(shown).rectangle([bx, by, max(bx, right * shown.width - 1), max(by, bottom * shown.height - 1)],
                                            outline=(230, 40, 40), width=2)
        sheet.paste(shown, (x0 + (cell - shown.width) // 2, y0 + (cell - shown.height) // 2))
        seen = canonical.image.convert("RGB").resize((cell, cell), Image.NEAREST)
        sheet.paste(seen, (x0 + cell + 4, y0))
        a = answers[name][i]
        truth = sets[name]["labels"]
        lines = [name, f"-> {a['label']} ({a['confidence']:.2f})"]
        if truth is not None:
            lines.append(f"true: {spec.class_names[int(truth[i])]}")
        flags = [f for f, on in (("OUT OF DISTRIBUTION", a.get("out_of_distribution")), ("uncertain", a["uncertain"])) if on]
        lines.append(", ".join(flags) if flags else "confident")
        lines.append(f"ood_score {a.get('ood_score')}")
        for j, line in enumerate(lines):
            draw.text((x0 + 2 * cell + 12, y0 + 8 + 18 * j), line, fill=(180, 0, 0) if "OUT" in line else (0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def markdown(results: dict) -> str:
    """The results as a Markdown table (one row per set)."""
    lines = ["| set | kind | n | accuracy | confidently wrong | flagged OOD | uncertain | AUROC vs native |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["sets"].items():
        cells = [f"{row[k]:.1%}" if k in row else "" for k in ("accuracy", "confidently_wrong", "flagged_ood", "uncertain")]
        cells.append(f"{row['auroc']:.3f}" if "auroc" in row else "")
        lines.append(f"| {name} | {row['kind']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    sets = build_sets(args.data, args.per_set, args.limit, args.scenes)
    offline = Offline(args.model_file) if args.offline else None
    client = None if offline is not None else TorchServeClient.from_config(args.config)
    answers = {}
    for name, entry in sets.items():
        if offline is not None:
            answers[name] = offline.answers(entry["bytes"], name)
        else:
            answers[name] = http_answers(client, args.model, entry["bytes"], args.concurrency, desc=name)
    native_scores = [a.get("ood_score") for a in answers["native"]]
    results = {"source": "offline" if offline else "http", "sets": {}}
    for name, entry in sets.items():
        row = summarise(answers[name], entry["labels"], None if name == "native" else native_scores)
        results["sets"][name] = {"kind": entry["kind"], **row}
    photos = [results["sets"][s] for s in STYLES]
    outliers = [results["sets"][s] for s in NON_GARMENT_SETS]
    results["summary"] = {
        "native_accuracy": results["sets"]["native"]["accuracy"],
        "photo_accuracy": float(np.mean([r["accuracy"] for r in photos])),
        "photo_confidently_wrong": float(np.mean([r["confidently_wrong"] for r in photos])),
        "photo_flagged_ood": float(np.mean([r["flagged_ood"] for r in photos])),
        "native_flagged_ood": results["sets"]["native"]["flagged_ood"],
        "non_garment_flagged_ood": float(np.mean([r["flagged_ood"] for r in outliers])),
    }
    for name, row in results["sets"].items():
        if row["kind"] == "phone photo":
            results["summary"][f"{name}_accuracy"] = row["accuracy"]
            results["summary"][f"{name}_confidently_wrong"] = row["confidently_wrong"]
    width = max(map(len, sets))
    for name, row in results["sets"].items():
        shown = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
        print(f"{name:<{width}}  {row['kind']:<13}  {shown}")
    print("summary:", json.dumps({k: round(v, 4) for k, v in results["summary"].items()}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results))
    if args.grid:
        grid(sets, answers, read_model(args.model_file).spec, args.grid)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
