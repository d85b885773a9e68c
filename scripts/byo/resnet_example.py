"""The README's ResNet-18 example, archived with the same command as any model (random weights: it says so).

    python -m scripts.byo.resnet_example          # -> build/resnet18/{resnet18.pt, spec.json}, build/resnet18/data/
    make archive MODEL=build/resnet18/resnet18.pt SPEC=build/resnet18/spec.json DATA=build/resnet18/data NAME=resnet18

``scripts.train.build_resnet`` scripts a torchvision ResNet-18 with random weights (nothing is downloaded) and
writes its ImageNet-style spec (3x224x224, resize 256 then centre crop, ImageNet mean/std, 1000 classes named
class_000..class_999).  The labelled folder holds real labelled images of ten of those classes: scikit-learn's
handwritten digits, digit d in ``data/class_00d/`` (as RGB PNGs).  The model never saw them, nor anything else,
so the report measures it at chance and says so; its temperature, thresholds, detector and golden inputs are
fitted all the same, and the archive serves.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.byo.digits import load_digits_uint8
from scripts.train.build_resnet import DEFAULT_OUT, build


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--per-class", type=int, default=20, help="digits per class folder")
    return p


def main(args: argparse.Namespace) -> dict[str, Path]:
    paths = build(args.out)
    images, labels = load_digits_uint8()
    data = args.out / "data"
    for digit in range(10):
        folder = data / f"class_{digit:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for row in np.flatnonzero(labels == digit)[: args.per_class]:
            buffer = io.BytesIO()
            Image.fromarray(images[row]).convert("RGB").save(buffer, format="PNG")
            (folder / f"{row:04d}.png").write_bytes(buffer.getvalue())
    print(f"wrote {paths['model']} and {paths['spec']}; {10 * args.per_class} labelled digits in {data}/class_00<d>/\n"
          f"now: make archive MODEL={paths['model']} SPEC={paths['spec']} DATA={data} NAME=resnet18")
    return {**paths, "data": data}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
