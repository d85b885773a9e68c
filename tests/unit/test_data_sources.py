"""Training accepts the shared subset, the official IDX files, and class-per-folder trees."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from scripts.train import train
from scripts.train.data import load_dataset, load_idx_dir, split
from tests.conftest import DATA

pytestmark = pytest.mark.skipif(not DATA.exists(), reason="shared dataset not present")


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_official_file_names_use_t10k_as_the_held_out_split(tmp_path):
    ds = load_idx_dir(DATA)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", ds.images[:3000])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ds.labels[:3000])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", ds.images[3000:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", ds.labels[3000:])
    official = load_idx_dir(tmp_path)
    assert len(official) == 3500
    parts = split(official, seed=0)
    assert set(parts.holdout) == set(range(3000, 3500))
    assert not set(parts.train) & set(parts.holdout)


def test_class_per_folder_tree_of_any_size_images(tmp_path):
    ds = load_idx_dir(DATA)
    for cls in ("boot", "shirt"):
        (tmp_path / cls).mkdir()
    for i in range(6):
        Image.fromarray(ds.images[i]).resize((56, 56)).save(tmp_path / ("boot" if i % 2 else "shirt") / f"{i}.png")
    folder = load_dataset(tmp_path, train.fashion_spec())
    assert folder.class_names == ("boot", "shirt")
    assert folder.images.shape == (6, 28, 28) and sorted(folder.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_training_writes_a_checkpoint_a_report_and_a_confusion_matrix(tmp_path):
    ds = load_idx_dir(DATA)
    small = tmp_path / "small"
    small.mkdir()
    write_idx(small / "images-idx3-ubyte.gz", ds.images[:400])
    write_idx(small / "labels-idx1-ubyte.gz", ds.labels[:400])
    args = train.get_args_parser().parse_args(
        ["--data", str(small), "--epochs", "1", "--out", str(tmp_path / "ckpt"), "--report-dir", str(tmp_path / "report")]
    )
    report = train.main(args)
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists()
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "report" / "train_report.json").read_text())
    assert saved["split"]["holdout"] == 80 and len(saved["per_class_accuracy"]) == 10
    assert np.array(saved["confusion_matrix"]).sum() == 80
    assert 0.0 <= report["holdout_accuracy"] <= 1.0
