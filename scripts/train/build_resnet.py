"""Build a scripted torchvision ResNet-18 (random weights, no download) and the spec that serves it.

    python -m scripts.train.build_resnet                      # -> build/resnet18/{resnet18.pt, spec.json, index_to_name.json}
    python -m scripts.deploy.package --model build/resnet18/resnet18.pt --spec build/resnet18/spec.json \\
        --name resnet18 --config my-resnet18-config.yaml

It shows that the handler serves any image classifier by configuration: the same
``handler/`` code that serves the 1x28x28 Fashion CNN serves this 3x224x224,
1000-class network with only a different ``spec.json`` (resize the shorter side to
256 then centre-crop 224, ImageNet mean/std, 1000 class names). The weights are
random (``weights=None``), so the answers are meaningless but the shapes, the
preprocessing and the cost are those of a real ResNet-18.

The ``.pt`` carries no spec in its extra files: the spec travels beside it in the
archive (``--spec``), so TorchServe's built-in ``image_classifier`` handler can
serve the very same file (with ``index_to_name.json``) for the benchmark.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from handler.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from scripts.train.data import REPO

DEFAULT_OUT = REPO / "build" / "resnet18"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    return p


def class_names(n: int) -> tuple[str, ...]:
    width = len(str(n - 1))
    return tuple(f"class_{i:0{width}d}" for i in range(n))


def resnet_spec(classes: int = 1000, **overrides) -> ModelSpec:
    """ImageNet-style serving spec: shorter side -> 256, centre crop 224, ImageNet mean/std."""
    base = dict(
        name="resnet18",
        class_names=class_names(classes),
        input_size=(224, 224),
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="crop",
        resize_size=256,
        background=(0, 0, 0),
        tta=("identity", "hflip"),
        merge="mean_prob",
        temperature=1.0,
        threshold=0.5,
        top_k=5,  # what TorchServe's image_classifier answers, so the two do the same work
    )
    base.update(overrides)
    return ModelSpec(**base)


def build(out: Path = DEFAULT_OUT, seed: int = 0, classes: int = 1000, force: bool = False) -> dict[str, Path]:
    """Write resnet18.pt (TorchScript), spec.json and index_to_name.json into ``out``; return their paths."""
    from torchvision.models import resnet18

    paths = {"model": out / "resnet18.pt", "spec": out / "spec.json", "index_to_name": out / "index_to_name.json"}
    spec = resnet_spec(classes)
    if not force and all(p.exists() for p in paths.values()) and paths["spec"].read_text() == spec.to_json():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = resnet18(weights=None, num_classes=classes).eval()
    scripted = torch.jit.script(model)
    scripted.save(str(paths["model"]))
    paths["spec"].write_text(spec.to_json())
    paths["index_to_name"].write_text(json.dumps({str(i): name for i, name in enumerate(spec.class_names)}))
    return paths


def main(args: argparse.Namespace) -> dict[str, Path]:
    paths = build(args.out, args.seed, args.classes, args.force)
    size = paths["model"].stat().st_size / 2**20
    print(f"wrote {paths['model']} ({size:.1f} MiB), {paths['spec'].name}, {paths['index_to_name'].name} in {args.out}")
    return paths


if __name__ == "__main__":
    main(get_args_parser().parse_args())
