"""Held-out accuracy measured through the HTTP API of a running TorchServe, with and without TTA.

    make serve && python -m scripts.evaluate.http_accuracy          # against config.properties' addresses
    python -m scripts.evaluate.http_accuracy --offline               # the same split in-process (no server)

Both paths use the held-out split that training used (scripts.train.data.split, seed 0);
the integration tests assert that the two agree image by image.
"""

from __future__ import annotations

import argparse
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from handler.inference import Policy, classify
from handler.loader import read_model
from handler.preprocess import bytes_to_tensor
from scripts.train.data import DEFAULT_DATA, REPO, load_idx_dir, split


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The options every evaluation through the server shares (also scripts.evaluate.real_world's)."""
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", default="fashion_cnn")
    p.add_argument("--config", type=Path, default=REPO / "config.properties")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--offline", action="store_true", help="run the handler's code in-process instead of over HTTP")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--model-file", type=Path, default=REPO / "models" / "fashion_cnn.pt", help="for --offline")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def holdout_pngs(data: Path, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    ds = load_idx_dir(data)
    idx = split(ds, seed=seed).holdout
    pngs = []
    for img in ds.images[idx]:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, ds.labels[idx]


def http_answers(client, model: str, payloads: list[bytes], concurrency: int = 8, headers: dict | None = None,
                 content_type: str = "application/octet-stream", desc: str = "HTTP") -> list[dict]:
    """The server's answers to ``payloads``, in order, ``concurrency`` requests in flight."""
    def one(data: bytes) -> dict:
        return client.predict(model, data, headers=headers, content_type=content_type).json()

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(one, payloads), total=len(payloads), desc=desc, leave=False))


def http_predictions(client, model: str, pngs: list[bytes], tta: bool, concurrency: int = 8) -> list[dict]:
    return http_answers(client, model, pngs, concurrency, headers={"X-TTA": "on" if tta else "off"},
                        content_type="image/png", desc=f"HTTP tta={'on' if tta else 'off'}")


def offline_predictions(model_file: Path, pngs: list[bytes], tta: bool) -> list[dict]:
    model, spec = read_model(model_file)[:2]
    model.eval()
    x = torch.stack([bytes_to_tensor(p, spec) for p in pngs])
    probs = classify(model, x, torch.full((len(pngs),), tta), Policy.from_spec(spec)).probs
    conf, idx = probs.max(dim=1)
    return [{"class_index": int(i), "confidence": float(c)} for c, i in zip(conf, idx)]


def accuracy(predictions: list[dict], labels: np.ndarray) -> float:
    return float(np.mean([p["class_index"] == y for p, y in zip(predictions, labels)]))


def main(args: argparse.Namespace) -> dict:
    pngs, labels = holdout_pngs(args.data)
    results = {"n": len(labels), "source": "offline" if args.offline else "http"}
    for tta in (False, True):
        if args.offline:
            preds = offline_predictions(args.model_file, pngs, tta)
        else:
            from scripts.ops.tsclient import TorchServeClient

            preds = http_predictions(TorchServeClient.from_config(args.config), args.model, pngs, tta, args.concurrency)
        results["accuracy_tta" if tta else "accuracy_no_tta"] = accuracy(preds, labels)
    print(f"held-out ({results['n']} images, {results['source']}): accuracy {results['accuracy_no_tta']:.4f} "
          f"without TTA, {results['accuracy_tta']:.4f} with TTA")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
