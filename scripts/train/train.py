"""Train the VGG-style CNN and write a checkpoint plus a held-out report.

    python -m scripts.train.train                                  # the shared Fashion-MNIST subset
    python -m scripts.train.train --data ~/fashion-mnist/raw       # the official IDX files (t10k held out)
    python -m scripts.train.train --data my_images/                # one sub-folder per class
    python -m scripts.train.train --download --data data/          # fetch the official files first (online)

With a canonicalising spec (the default), every batch pairs the native garments with
the same garments photographed (``scripts.train.scenes.training_photo``: catalogue photos
and phone scenes of every kind, the train regime's parameters) and brought back from the
JPEG bytes by the server's own preprocessing, with small rotations and scales: the model
learns what canonicalisation leaves of a photo without seeing fewer native images.

Then ``python -m scripts.train.export`` turns the checkpoint into the served TorchScript file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from handler.spec import ModelSpec
from handler.tta import background_fill
from scripts.train.data import REPO, eval_tensors, fashion_spec, load_dataset, split
from scripts.train.labelled import add_trees
from scripts.train.model import FashionCNN
from scripts.train.scenes import training_photo


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="IDX folder or class-per-folder tree (default: shared subset)")
    p.add_argument("--add", action="append", default=[], metavar="DIR",
                   help="also train on this class-per-folder tree (ctl export-labelled); training split only; repeatable")
    p.add_argument("--download", action="store_true", help="download the official Fashion-MNIST into --data first")
    p.add_argument("--out", type=Path, default=REPO / "build" / "train", help="checkpoint folder")
    p.add_argument("--report-dir", type=Path, default=REPO / "docs" / "training", help="report + confusion matrix")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--max-shift", type=int, default=2, help="training augmentation: random shift in pixels")
    p.add_argument("--no-hflip", action="store_true", help="do not flip left-right during training")
    p.add_argument("--photo-variants", type=int, default=3,
                   help="photos (catalogue and phone scenes) rendered per training image and canonicalised back; every batch pairs the "
                        "native images with one of their photos (0: native images only; needs spec.canonical)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995,
                   help="keep an exponential moving average of the weights (and BatchNorm statistics) with this "
                        "decay per step and export it; 0 exports the last weights")
    p.add_argument("--rotate", type=float, default=6.0, help="photo augmentation: random rotation, degrees")
    p.add_argument("--scale", type=float, default=0.1, help="photo augmentation: random scale, +/- this share")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction (ignored with official t10k)")
    p.add_argument("--calib", type=float, default=0.1, help="fraction used to fit the temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    return p


def augment(x: torch.Tensor, fill: torch.Tensor, max_shift: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random label-preserving shifts (background fill) and left-right flips, per sample."""
    n, _, h, w = x.shape
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), torch.flip(x, dims=(-1,)), x)
    if max_shift > 0:
        s = max_shift
        padded = fill.expand(n, x.shape[1], h + 2 * s, w + 2 * s).clone()
        padded[..., s : s + h, s : s + w] = x
        offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=gen)
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    return x


def affine_jitter(x: torch.Tensor, fill: torch.Tensor, degrees: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Random small rotations and scales per sample (background fill): what canonicalisation leaves of a photo."""
    if degrees <= 0 and scale <= 0:
        return x
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    factor = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.cos(angle) / factor
    theta[:, 0, 1] = -torch.sin(angle) / factor
    theta[:, 1, 0] = torch.sin(angle) / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _render_variants(job: tuple[np.ndarray, int, int, ModelSpec]) -> torch.Tensor:
    garment, seed, count, spec = job
    rng = np.random.default_rng(seed)
    photos = [training_photo(garment, rng) for _ in range(count)]
    return eval_tensors(photos, spec)  # the JPEG files through the server's own decoding


def photo_pool(images: np.ndarray, spec: ModelSpec, count: int, seed: int) -> torch.Tensor:
    """(N, count, C, H, W): each training image photographed ``count`` times (``training_photo``, JPEG files)
    and brought back by the server's own path from the bytes (``handler.preprocess.bytes_to_input``)."""
    jobs = [(img, seed * 1_000_003 + i, count, spec) for i, img in enumerate(images)]
    with multiprocessing.get_context("fork").Pool(min(4, os.cpu_count() or 1)) as pool:
        rendered = list(tqdm(pool.imap(_render_variants, jobs, chunksize=32), total=len(jobs), desc="render photos",
                             unit="image"))
    return torch.stack(rendered)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def plot_confusion(cm: np.ndarray, class_names, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = fashion_spec()
    dataset = load_dataset(args.data, spec, download=args.download)
    parts = split(dataset, seed=args.seed, holdout=args.holdout, calib=args.calib)
    if args.add:  # labelled answers (scripts/train/labelled.py): training split only, held-out split unchanged
        dataset, parts, added = add_trees(dataset, parts, args.add, spec)
        print(f"added {added} labelled images from {', '.join(map(str, args.add))} to the training split")
    # Normalisation statistics come from the training split only.
    train_pixels = dataset.images[parts.train].astype(np.float64) / 255.0
    channels = 1 if dataset.images.ndim == 3 else 3
    axes = (0, 1, 2)
    mean = np.atleast_1d(train_pixels.mean(axis=axes)).round(4)
    std = np.atleast_1d(train_pixels.std(axis=axes)).round(4)
    spec = dataclasses.replace(
        spec,
        class_names=dataset.class_names,
        channels=channels,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        background=spec.background * channels,
        input_size=tuple(dataset.images.shape[1:3]),
    )
    print(f"data: {dataset.source}: {len(dataset)} images, {spec.num_classes} classes; "
          f"split train/calib/holdout = {len(parts.train)}/{len(parts.calib)}/{len(parts.holdout)}")

    x_all = eval_tensors(dataset.images, spec)  # the server's preprocessing, image by image
    y_all = torch.from_numpy(dataset.labels)
    x_train, y_train = x_all[parts.train], y_all[parts.train]
    x_hold, y_hold = x_all[parts.holdout], y_all[parts.holdout]
    use_photos = args.photo_variants > 0 and spec.canonical is not None and dataset.images.ndim == 3
    photos = photo_pool(dataset.images[parts.train], spec, args.photo_variants, args.seed + 1) if use_photos else None

    model_args = {"num_classes": spec.num_classes, "in_channels": channels, "widths": [32, 64, 128], "dropout": args.dropout}
    model = FashionCNN(**model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    gen = torch.Generator().manual_seed(args.seed)
    fill = background_fill(spec)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    history = []
    started = time.time()
    bar = tqdm(range(args.epochs), desc="train", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            pick = torch.randint(0, photos.shape[1], (len(idx),), generator=gen) if photos is not None else None
            xb, yb = augment(x_train[idx], fill, args.max_shift, not args.no_hflip, gen), y_train[idx]
            if photos is not None:  # the same garments as they look after a photo was canonicalised
                xp = augment(photos[idx, pick], fill, args.max_shift, not args.no_hflip, gen)
                xb = torch.cat([xb, affine_jitter(xp, fill, args.rotate, args.scale, gen)])
                yb = torch.cat([yb, yb])
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            total += len(yb)
        served = ema.module if ema is not None else model
        hold_acc = (predict_logits(served, x_hold).argmax(1) == y_hold).float().mean().item()
        history.append({"epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total, "holdout_acc": hold_acc})
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", train=f"{correct / total:.3f}", holdout=f"{hold_acc:.3f}")

    model = ema.module if ema is not None else model
    model.eval()
    preds = predict_logits(model, x_hold).argmax(1).numpy()
    labels = y_hold.numpy()
    cm = confusion(labels, preds, spec.num_classes)
    per_class = {name: float(cm[i, i] / max(cm[i].sum(), 1)) for i, name in enumerate(spec.class_names)}
    accuracy = float((preds == labels).mean())
    report = {
        "data": dataset.source,
        "split": {"train": len(parts.train), "calib": len(parts.calib), "holdout": len(parts.holdout), "seed": args.seed},
        "epochs": args.epochs,
        "train_seconds": round(time.time() - started, 1),
        "holdout_accuracy": accuracy,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "history": history,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "model_args": model_args,
            "spec": spec.to_dict(),
            "train": (dataset.images[parts.train], dataset.labels[parts.train]),
            "calib": (dataset.images[parts.calib], dataset.labels[parts.calib]),
            "holdout": (dataset.images[parts.holdout], dataset.labels[parts.holdout]),
            "report": report,
        },
        args.out / "checkpoint.pt",
    )
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(cm, spec.class_names, args.report_dir / "confusion_matrix.png",
                   f"held-out confusion matrix (n={len(labels)}, accuracy {accuracy:.1%})")
    print(f"held-out accuracy {accuracy:.4f} on {len(labels)} images; per class:")
    for name, acc in per_class.items():
        print(f"  {name:<12} {acc:.3f}")
    print(f"checkpoint: {args.out / 'checkpoint.pt'}; report: {args.report_dir}")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
