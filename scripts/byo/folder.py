"""A labelled folder of images as the user gives it (``DATA=dir/``: one sub-folder per class), split stratified.

The files are kept as they are (their bytes): every evaluation sends them through the server's own
``handler.preprocess.bytes_to_input``, exactly as an upload, so what is measured is what is served.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from handler.preprocess import decode_image
from scripts.train.data import IMAGE_SUFFIXES


class DataError(ValueError):
    """The labelled folder cannot be used as it is; the message says what to change."""


def natural_key(name: str) -> list:
    """'2' before '10', case-insensitive: the order people number their class folders in."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass
class Folder:
    root: Path
    class_names: tuple[str, ...]  # the sub-folders, in natural order
    files: list[bytes]  # each image file as it is on disk
    paths: list[Path]
    labels: np.ndarray  # int64 (N,), index into class_names

    def __len__(self) -> int:
        return len(self.files)

    def images(self, rows=None) -> list[Image.Image]:
        """Decoded by the server's decoder (upright, 8-bit 'L' or 'RGB', every pixel), for measurements that
        try several specs on the same pixels."""
        rows = range(len(self)) if rows is None else rows
        return [decode_image(self.files[i]) for i in rows]


def load(root: Path, min_per_class: int = 4) -> Folder:
    """``root/<class>/<image>`` (images may sit deeper inside a class folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: DATA must be a folder with one sub-folder of images per class")
    classes = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class sub-folder(s): DATA needs one sub-folder per class "
                        "(at least two), e.g. DATA/cat/*.jpg, DATA/dog/*.jpg")
    files, paths, labels, few = [], [], [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(found) < min_per_class:
            few.append(f"{name} ({len(found)})")
        for path in found:
            files.append(path.read_bytes())
            paths.append(path)
            labels.append(index)
    if few:
        raise DataError(f"{root}: every class needs at least {min_per_class} images to be split into calibration and "
                        f"test parts; too few in: {', '.join(few)} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return Folder(root, tuple(classes), files, paths, np.asarray(labels, dtype=np.int64))


@dataclass(frozen=True)
class Parts:
    fit: np.ndarray  # the detector's class statistics and combination
    tune: np.ndarray  # the detector's threshold
    test: np.ndarray  # the report's figures: never fitted on

    @property
    def calibration(self) -> np.ndarray:
        """Temperature and the "uncertain" threshold: fit and tune together."""
        return np.sort(np.concatenate([self.fit, self.tune]))


def split(labels: np.ndarray, test_share: float = 0.5, seed: int = 0) -> Parts:
    """Stratified: per class, ``test_share`` to the test part, the rest to calibration, itself halved into the
    detector's fit and tune parts."""
    if not 0.1 <= test_share <= 0.9:
        raise DataError(f"the test share must be in [0.1, 0.9]; got {test_share}")
    rng = np.random.default_rng(seed)
    fit, tune, test = [], [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, int(round(len(idx) * test_share)))
        rest = idx[n_test:]
        n_fit = max(1, len(rest) // 2)
        test.extend(idx[:n_test])
        fit.extend(rest[:n_fit])
        tune.extend(rest[n_fit:])
    return Parts(*(np.sort(np.asarray(p, dtype=np.int64)) for p in (fit, tune, test)))
