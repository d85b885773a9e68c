"""Labelled answers back into training: ``make train ADD=DIR`` (``scripts.train.train --add DIR``).

``DIR`` is a class-per-folder tree as ``ctl export-labelled`` writes it: one folder per class (``00_T-shirt-top``,
...), ``classes.json`` mapping each folder to its class name, and in each folder the canonical inputs the model saw
(the server's canonicalisation already applied; running it again leaves a canonical image as it is, like a native
one). A tree without ``classes.json`` is matched by folder name: the class name, or ``NN_<name>``, any case, ``/``
written as ``-``.

The added images go to the **training split only**: the held-out and calibration splits stay those of the base data
(same seed, same images), so the retrained model's held-out figures compare with the old model's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.train.data import IMAGE_SUFFIXES, Dataset, Split, canonical_image


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def folder_classes(tree: Path, class_names: tuple[str, ...]) -> dict[str, int]:
    """Folder name -> class index in ``class_names`` for the tree's folders (unknown folders raise, saying which)."""
    mapping_file = tree / "classes.json"
    by_key = {_key(name): i for i, name in enumerate(class_names)}
    folders = sorted(p.name for p in tree.iterdir() if p.is_dir())
    named = json.loads(mapping_file.read_text())["folders"] if mapping_file.exists() else {}
    out, unknown = {}, []
    for folder in folders:
        name = named.get(folder) or re.sub(r"^[0-9]+_", "", folder)
        index = by_key.get(_key(name))
        if index is None:
            unknown.append(folder)
        else:
            out[folder] = index
    if unknown:
        raise ValueError(f"{tree}: folders {unknown} name no class of the training data ({', '.join(class_names)})")
    return out


def add_trees(dataset: Dataset, parts: Split, trees: list[Path], spec) -> tuple[Dataset, Split, int]:
    """The dataset with every tree's images appended, and the split with them in its training part only."""
    images, labels = [], []
    for tree in trees:
        for folder, index in folder_classes(Path(tree), dataset.class_names).items():
            for path in sorted((Path(tree) / folder).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    with Image.open(path) as img:
                        images.append(np.asarray(canonical_image(img, spec).image, dtype=np.uint8))
                    labels.append(index)
    if not images:
        return dataset, parts, 0
    added = np.stack(images)
    if added.shape[1:] != dataset.images.shape[1:]:
        raise ValueError(f"the added images are {added.shape[1:]}, the training data {dataset.images.shape[1:]}")
    start = len(dataset)
    merged = Dataset(np.concatenate([dataset.images, added]), np.concatenate([dataset.labels, np.asarray(labels)]),
                     dataset.class_names, f"{dataset.source} + {', '.join(str(t) for t in trees)}",
                     None if dataset.official_test is None else np.concatenate(
                         [dataset.official_test, np.zeros(len(added), dtype=bool)]))
    train = np.concatenate([parts.train, np.arange(start, start + len(added))])
    return merged, Split(train, parts.calib, parts.holdout), len(added)
