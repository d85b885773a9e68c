"""Datasets for training and evaluation: IDX files, class-per-folder trees, or a download.

Every source is reduced to uint8 arrays already in the model's mode and size
(via ``handler.preprocess.canonical_image``, the server's canonicalisation) plus
integer labels; ``eval_inputs`` then runs ``handler.preprocess.image_to_input`` on
each, the very function the server runs on uploads.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handler.canonical import CanonicalSpec
from handler.preprocess import bytes_to_input, canonical_image, image_to_input
from handler.spec import FASHION_MNIST_CLASSES, ModelSpec

REPO = Path(__file__).resolve().parents[2]  # scripts/<package>/<module>.py -> the repository
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "fashion-mnist-subset"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# (images, labels) file stems: the shared subset's names, then the official ones.
_IDX_PAIRS = {
    "subset": ("images-idx3-ubyte", "labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, H, W) or (N, H, W, 3), already in model mode and size
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    source: str
    # For official IDX files: which rows came from t10k (used as the held-out split).
    official_test: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _open(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 2049 = labels, 2051 = images."""
    data = _open(path)
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    return None


def load_idx_dir(directory: Path) -> Dataset:
    """The shared subset, or the official Fashion-MNIST files (train + t10k)."""
    found = {}
    for key, (img_stem, lbl_stem) in _IDX_PAIRS.items():
        images, labels = _find(directory, img_stem), _find(directory, lbl_stem)
        if images and labels:
            found[key] = (read_idx(images), read_idx(labels).astype(np.int64))
    if not found:
        raise FileNotFoundError(
            f"{directory}: no IDX files found (expected images-idx3-ubyte[.gz]/labels-idx1-ubyte[.gz] "
            "or the official train-*/t10k-* files)"
        )
    parts, is_test = [], []
    for key in ("subset", "train", "test"):
        if key in found:
            images, labels = found[key]
            if len(images) != len(labels):
                raise ValueError(f"{directory}: {key} has {len(images)} images but {len(labels)} labels")
            parts.append((images, labels))
            is_test.append(np.full(len(labels), key == "test"))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    official = np.concatenate(is_test) if "train" in found and "test" in found else None
    return Dataset(images, labels, FASHION_MNIST_CLASSES, str(directory), official)


def load_folder(directory: Path, spec: ModelSpec) -> Dataset:
    """A class-per-folder tree: ``directory/<class name>/<image>``; classes sorted by name."""
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise FileNotFoundError(f"{directory}: expected one sub-folder per class, found {classes}")
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((directory / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as img:
                    images.append(np.asarray(canonical_image(img, spec).image, dtype=np.uint8))
                labels.append(index)
    if not images:
        raise FileNotFoundError(f"{directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes), str(directory))


def download_fashion_mnist(root: Path) -> Path:
    """Fetch the official files with torchvision (needs internet); returns their folder."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


def load_dataset(path: Path | None, spec: ModelSpec, download: bool = False) -> Dataset:
    if download:
        path = download_fashion_mnist(path or REPO / "data")
    path = Path(path or DEFAULT_DATA)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    has_subdirs = any(p.is_dir() for p in path.iterdir())
    has_idx = any("idx" in p.name for p in path.iterdir() if p.is_file())
    return load_idx_dir(path) if has_idx or not has_subdirs else load_folder(path, spec)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    calib: np.ndarray  # for fitting the temperature; never trained on
    holdout: np.ndarray  # reported accuracy; never trained or fitted on


def split(dataset: Dataset, seed: int = 0, holdout: float = 0.2, calib: float = 0.1) -> Split:
    """Stratified, seeded split. With official IDX files, t10k is the held-out split."""
    rng = np.random.default_rng(seed)
    train, cal, held = [], [], []
    if dataset.official_test is not None:
        held = list(np.flatnonzero(dataset.official_test))
        pool = np.flatnonzero(~dataset.official_test)
        holdout = 0.0
    else:
        pool = np.arange(len(dataset))
    for cls in np.unique(dataset.labels[pool]):
        idx = pool[dataset.labels[pool] == cls]
        idx = idx[rng.permutation(len(idx))]
        n_hold = int(round(len(idx) * holdout))
        n_cal = int(round(len(idx) * calib))
        held.extend(idx[:n_hold])
        cal.extend(idx[n_hold : n_hold + n_cal])
        train.extend(idx[n_hold + n_cal :])
    return Split(np.sort(np.asarray(train)), np.sort(np.asarray(cal)), np.sort(np.asarray(held)))


def eval_inputs(images, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training's eval transform: what the handler makes of every image.

    Items may be arrays or PIL images (``image_to_input``) or encoded files (``bytes``: the handler's own
    ``bytes_to_input``, decoding at the scale it needs, exactly as an upload). Returns the stacked tensors
    and the raw-image signals (None without canonicalisation).
    """
    pairs = [bytes_to_input(img, spec) if isinstance(img, bytes) else image_to_input(_as_image(img), spec)
             for img in images]
    tensors = torch.stack([t for t, _ in pairs])
    signals = torch.stack([s for _, s in pairs]) if pairs and pairs[0][1] is not None else None
    return tensors, signals


def eval_tensors(images, spec: ModelSpec) -> torch.Tensor:
    """``eval_inputs`` without the signals."""
    return eval_inputs(images, spec)[0]


def _as_image(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    return Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB")


def fashion_spec(**overrides) -> ModelSpec:
    """The default spec for Fashion-MNIST (white garment on black, 28x28 grayscale)."""
    base = dict(
        name="fashion_cnn",
        class_names=FASHION_MNIST_CLASSES,
        input_size=(28, 28),
        channels=1,
        mean=(0.2860,),
        std=(0.3530,),
        resize="pad",
        background=(0,),
        tta=("identity", "hflip"),
        merge="mean_prob",
        threshold=0.5,
        top_k=3,
        canonical=CanonicalSpec(),
    )
    base.update(overrides)
    return ModelSpec(**base)
