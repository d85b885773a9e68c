"""Build-time check of the serving image: everything on the serving path imports without torchvision.

Imports TorchServe's worker, its model loader and BaseHandler (what our handler subclasses),
the handler package (as the worker loads it) and every module of scripts.deploy and
scripts.ops, then fails if torchvision is installed or was imported by any of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the application root (/srv/app)

SERVING = [
    "ts.model_service_worker", "ts.model_loader", "ts.service", "ts.torch_handler.base_handler",
    "handler", "handler.tta_classifier",
]


def main() -> int:
    if importlib.util.find_spec("torchvision") is not None:
        print("torchvision is installed in the serving environment", file=sys.stderr)
        return 1
    modules = list(SERVING)
    for package in ("handler", "scripts.deploy", "scripts.ops"):
        path = importlib.import_module(package).__path__
        modules += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
    for name in modules:
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "captum"))
    if loaded:
        print(f"imported on the serving path: {loaded}", file=sys.stderr)
        return 1
    print(f"serving path imports without torchvision: {len(modules)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
