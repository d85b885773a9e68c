"""The worked example of bringing your own classifier: handwritten digits, trained here, archived, served.

    python -m scripts.byo.digits                          # -> build/sklearn_digits/{digits_cnn.pt, data/, other/, ...}
    make archive MODEL=build/sklearn_digits/digits_cnn.pt DATA=build/sklearn_digits/data NAME=digits \\
        ARCHIVE_ARGS="--ood-data build/sklearn_digits/other"
    make serve MAR=model_store/digits.mar

The data are scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, 16 grey levels, 10 classes,
``sklearn.datasets.load_digits``: shipped inside the package, nothing is downloaded), written as 8-bit PNGs
(light ink on black).  A stratified 40 % trains a small CNN (``nn.Sequential``: three 3x3 convolutions, a
hidden layer with dropout, no ``forward_features``: a model as a user brings it), exported to TorchScript
with nothing but the weights; the other 60 % becomes the labelled folder ``data/<digit>/`` the archive is
made from (the model never trained on it).  Training normalises as many training scripts do,
``Normalize((0.5,), (0.5,))``: pixels in [-1, 1]; ``true_spec.json`` records what the training used, for
checking the spec ``make archive`` proposes.

``other/`` holds images of other domains, for the report's out-of-distribution figures only (never
fitted on): Fashion-MNIST garments (the shared subset, when present) and photographs
(``scripts.evaluate.outliers``: crops of the photos shipped with scikit-image and scikit-learn).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from handler.preprocess import image_to_tensor
from handler.spec import ModelSpec
from scripts.train.data import DEFAULT_DATA, REPO, load_idx_dir
from scripts.train.data import split as fashion_split

OUT = REPO / "build" / "sklearn_digits"
CLASSES = tuple(str(d) for d in range(10))


def true_spec() -> ModelSpec:
    """What the training below uses: 1x8x8, pixels v/255 then (x - 0.5) / 0.5, light ink on black."""
    return ModelSpec(name="digits", class_names=CLASSES, input_size=(8, 8), channels=1, mean=(0.5,), std=(0.5,),
                     resize="pad", background=(0,), tta=("identity",), top_k=3)


def digits_cnn(dropout: float = 0.3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(64, 10),
    )


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--train-share", type=float, default=0.4, help="stratified share of the digits the CNN trains on")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other", type=int, default=300, help="images per other domain in other/ (0: none)")
    return p


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8), digits.target.astype(np.int64)


def stratified(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(len(idx) * share))
        first.extend(idx[:n])
        second.extend(idx[n:])
    return np.sort(np.asarray(first)), np.sort(np.asarray(second))


def shifted(x: torch.Tensor, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or 1 pixel in each direction, the background filling in."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=fill)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, fill: float) -> nn.Sequential:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(epochs), desc="training the digits CNN", leave=False)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 64):
            rows = order[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(shifted(x[rows], fill, generator)), y[rows])
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_other_domains(out: Path, n: int, seed: int) -> dict[str, int]:
    """other/fashion (Fashion-MNIST garments, when the shared subset is present) and other/photos."""
    from scripts.evaluate.outliers import non_garment_sets

    written = {}
    if DEFAULT_DATA.is_dir():
        ds = load_idx_dir(DEFAULT_DATA)
        rows = fashion_split(ds, seed=0).holdout[:n]
        (out / "fashion").mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            (out / "fashion" / f"{i:04d}.png").write_bytes(png(ds.images[row]))
        written["fashion"] = len(rows)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    photos = non_garment_sets(n, seed)["photos"]
    for i, img in enumerate(photos):
        img.convert("RGB").save(out / "photos" / f"{i:04d}.jpg", quality=90)
    written["photos"] = len(photos)
    return written


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    images, labels = load_digits_uint8()
    spec = true_spec()
    train_rows, data_rows = stratified(labels, args.train_share, args.seed)
    x = torch.stack([image_to_tensor(Image.fromarray(img), spec) for img in images])
    y = torch.from_numpy(labels)
    fill = (0.0 - spec.mean[0]) / spec.std[0]
    model = train(x[train_rows], y[train_rows], args.epochs, args.seed, fill)
    with torch.inference_mode():
        held_out = float((model(x[data_rows]).argmax(1) == y[data_rows]).float().mean())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "digits_cnn.pt"
    torch.jit.script(model).save(str(path))  # the weights only: no spec inside, as a user's model comes
    (args.out / "true_spec.json").write_text(spec.to_json() + "\n")
    data = args.out / "data"
    for digit in CLASSES:
        (data / digit).mkdir(parents=True, exist_ok=True)
        for old in (data / digit).glob("*.png"):
            old.unlink()
    for row in data_rows:
        (data / CLASSES[labels[row]] / f"{row:04d}.png").write_bytes(png(images[row]))
    other = write_other_domains(args.out / "other", args.other, args.seed) if args.other else {}
    summary = {"train_images": len(train_rows), "data_images": len(data_rows), "held_out_accuracy": round(held_out, 4),
               "epochs": args.epochs, "seconds": round(time.perf_counter() - started, 1), "other_domains": other}
    (args.out / "train_report.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path}: trained on {len(train_rows)} digits, {held_out:.1%} right on the other {len(data_rows)} "
          f"(written to {data}/<digit>/); other domains in {args.out / 'other'}: {other}; "
          f"{summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
