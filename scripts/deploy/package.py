"""Package a TorchScript classifier and the handler into a .mar with torch-model-archiver.

    python -m scripts.deploy.package                                   # models/fashion_cnn.pt -> model_store/fashion_cnn.mar
    python -m scripts.deploy.package --model my.pt --spec my_spec.json --name mynet --version 2.0

The archive holds the model (``.pt``), the handler entry point, the ``handler``
package (shipped with ``--extra-files``), ``spec.json`` / ``reference.json``
(copied out of the model, or ``--spec``), ``model-config.yaml``, and the int8
variant ``<stem>.int8.pt`` when the exporter wrote one beside the model (served when
the config's ``handler: precision:`` is ``int8``; packaging fails if it asks for one
that is not there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from handler.loader import PRECISIONS, int8_path, read_model
from handler.spec import REFERENCE_FILENAME, SPEC_FILENAME, ModelSpec
from scripts.train.data import REPO

HANDLER_DIR = REPO / "handler"
ENTRY_POINT = HANDLER_DIR / "tta_classifier.py"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "fashion_cnn.pt", help="TorchScript file (.pt)")
    p.add_argument("--spec", type=Path, default=None, help="spec.json for a model that carries none")
    p.add_argument("--name", default="fashion_cnn")
    p.add_argument("--version", default="1.0")
    p.add_argument("--config", type=Path, default=HANDLER_DIR / "model-config.yaml")
    p.add_argument("--export-path", type=Path, default=REPO / "model_store")
    p.add_argument("--archive-name", default=None, help="file name without .mar (default: --name)")
    p.add_argument("--handler-dir", type=Path, default=HANDLER_DIR,
                   help="the handler package to ship (default: handler/; its tta_classifier.py is the entry point)")
    return p


def archiver() -> str:
    local = Path(sys.executable).parent / "torch-model-archiver"
    return str(local) if local.exists() else shutil.which("torch-model-archiver") or "torch-model-archiver"


def main(args: argparse.Namespace) -> Path:
    if args.model.suffix != ".pt":
        raise SystemExit(f"{args.model}: TorchServe loads TorchScript only from a file ending in .pt")
    with tempfile.TemporaryDirectory(prefix="package-") as tmp:
        return _package(args, Path(tmp))


def int8_variant(model: Path, config: Path) -> Path | None:
    """The int8 file to ship beside ``model`` (None if there is none); fails if the config asks for int8 without one."""
    handler = (yaml.safe_load(config.read_text()) or {}).get("handler") or {}
    precision = handler.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise SystemExit(f"{config}: handler.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    int8 = int8_path(model)
    if int8.is_file():
        return int8
    if precision == "int8":
        raise SystemExit(f"{config} asks for handler.precision: int8 but there is no {int8} beside {model}: "
                         "export it with `python -m scripts.train.export` (it writes <stem>.int8.pt), "
                         "or package with a config that says precision: fp32")
    return None


def _package(args: argparse.Namespace, stage: Path) -> Path:
    int8 = int8_variant(args.model, args.config)
    (stage / "extra").mkdir(parents=True)
    # The handler package travels as a folder: torch-model-archiver copies the
    # *contents* of an --extra-files folder, so stage it one level down.
    shutil.copytree(args.handler_dir, stage / "extra" / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.yaml"))
    if args.spec:
        spec = ModelSpec.from_json(args.spec.read_text())  # validate before packaging
        (stage / "extra" / SPEC_FILENAME).write_text(spec.to_json())
    else:
        _, spec, reference = read_model(args.model)[:3]
        (stage / "extra" / SPEC_FILENAME).write_text(spec.to_json())
        if reference:
            (stage / "extra" / REFERENCE_FILENAME).write_text(json.dumps(reference))
    if int8 is not None:  # lands beside the serialized file in the model folder, where handler/loader.py looks
        shutil.copy(int8, stage / "extra" / int8.name)
    # Build into the staging folder, then move: torch-model-archiver names the file after
    # --model-name, and building in the store would overwrite another version's archive.
    (stage / "out").mkdir()
    cmd = [
        archiver(),
        "--model-name", args.name,
        "--version", args.version,
        "--serialized-file", str(args.model),
        "--handler", str(args.handler_dir / ENTRY_POINT.name),
        "--extra-files", str(stage / "extra"),
        "--config-file", str(args.config),
        "--export-path", str(stage / "out"),
        "--archive-format", "default",
    ]
    subprocess.run(cmd, check=True)
    args.export_path.mkdir(parents=True, exist_ok=True)
    target = args.export_path / f"{args.archive_name or args.name}.mar"
    shutil.move(stage / "out" / f"{args.name}.mar", target)
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB): {spec.name} v{args.version}, TTA {list(spec.tta)}"
          + (f", with {int8.name}" if int8 is not None else ""))
    return target


if __name__ == "__main__":
    main(get_args_parser().parse_args())
