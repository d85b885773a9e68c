"""Load the TorchScript model and its spec once per worker, and size the worker's threads."""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import torch

from handler import decode
from handler.cores import cpu_count
from handler.errors import SpecError
from handler.inference import check_model
from handler.ood import OOD_FILENAME
from handler.spec import REFERENCE_FILENAME, SPEC_FILENAME, ModelSpec

GOLDEN_FILENAME = "golden.json"
EXTRA_FILES = (SPEC_FILENAME, REFERENCE_FILENAME, OOD_FILENAME, GOLDEN_FILENAME)
# The int8 variant scripts/train/export.py writes beside a model: <stem>.int8.pt, with quantization.json
# (engine, qconfig, its agreement with fp32) among its extra files.
QUANTIZATION_FILENAME = "quantization.json"
INT8_SUFFIX = ".int8.pt"
PRECISIONS = ("fp32", "int8")
# Methods a scripted model may offer besides forward; freezing must keep them.
FEATURE_METHODS = ("forward_features", "head")


class Artifact(NamedTuple):
    """A TorchScript classifier and the JSON files that travel with it."""

    model: torch.jit.ScriptModule
    spec: ModelSpec
    reference: dict  # held-out distributions (drift reference); {} if none
    ood: dict | None  # ood.json: the features detector's parameters
    golden: list  # golden.json: inputs and the answers the exporter saw; [] if none

logger = logging.getLogger(__name__)

# handler: keys in model-config.yaml that configure the worker rather than the spec.
WORKER_KEYS = ("threads", "optimize", "precision")


def resolve_threads(setting: Any, workers: int) -> int:
    """``threads: auto`` gives each worker an equal share of the cores (at least 1)."""
    if setting in (None, "auto"):
        return max(1, cpu_count() // max(1, workers))
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting
    raise SpecError(f"handler.threads must be 'auto' or a positive integer; got {setting!r}")


def int8_path(path: Path) -> Path:
    """Where the int8 variant of a TorchScript file lives: ``<stem>.int8.pt`` beside it."""
    return path.with_name(path.stem + INT8_SUFFIX)


def read_extra_file(path: Path, name: str) -> str | None:
    """One extra file of a TorchScript archive, read without loading the model (None if absent)."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(f"/extra/{name}"):
                return archive.read(member).decode("utf-8")
    return None


def read_model(path: Path, model_dir: Path | None = None, sidecars: bool = True) -> Artifact:
    """Load a TorchScript file with its spec (and reference, OOD parameters, golden answers) from its extra files.

    A file of the same name next to the model (inside the archive) is used when the
    TorchScript file carries none, so any scripted classifier can be served by
    packaging a spec beside it (``sidecars=False``: the file's own extra files only).
    """
    extra = dict.fromkeys(EXTRA_FILES, "")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    texts = {}
    for name, value in extra.items():
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        side = (model_dir or path.parent) / name
        if not text and sidecars and side.is_file():
            text = side.read_text()
        texts[name] = text
    if not texts[SPEC_FILENAME]:
        raise SpecError(f"{path.name} carries no {SPEC_FILENAME} and none is packaged beside it")
    spec = ModelSpec.from_json(texts[SPEC_FILENAME])
    reference = json.loads(texts[REFERENCE_FILENAME]) if texts[REFERENCE_FILENAME] else {}
    ood = json.loads(texts[OOD_FILENAME]) if texts[OOD_FILENAME] else None
    golden = json.loads(texts[GOLDEN_FILENAME]) if texts[GOLDEN_FILENAME] else []
    return Artifact(model, spec, reference, ood, golden)


def has_method(model, name: str) -> bool:
    if isinstance(model, torch.jit.ScriptModule):
        return model._c._has_method(name)
    return callable(getattr(model, name, None))


def optimized(model, spec: ModelSpec, device: torch.device, tolerance: float = 1e-4):
    """Freeze the model (BatchNorm folded into convolutions, constants inlined) and, on CPU,
    apply torch's inference passes; ~1.5x faster for the Fashion CNN on one core.

    Done per worker at load (the artifact stays portable). The result must match the
    exported model on a random batch, else the exported model is served unchanged.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keep = [name for name in FEATURE_METHODS if has_method(model, name)]
            fast = torch.jit.freeze(model, preserved_attrs=keep)
            if device.type == "cpu":
                fast = torch.jit.optimize_for_inference(fast, other_methods=[n for n in keep if n == "forward_features"])
    except Exception as exc:  # a model freeze cannot handle is still served, just slower
        logger.warning("Serving the model as exported: freezing it failed (%s)", exc)
        return model
    c, (h, w) = spec.channels, spec.input_size
    x = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        reference, candidate = model(x), fast(x)
        diff = (reference - candidate).abs().max().item()
        if has_method(model, "forward_features"):
            diff = max(diff, max((a - b).abs().max().item()
                                 for a, b in zip(model.forward_features(x)[:2], fast.forward_features(x)[:2])))
    if not diff <= tolerance * max(1.0, reference.abs().max().item()):
        logger.warning("Serving the model as exported: the frozen model differs by %.3g", diff)
        return model
    return fast


class Loaded(NamedTuple):
    artifact: Artifact  # the fp32 model as read (explanations need its gradients), with the spec after the handler: overrides
    model: torch.jit.ScriptModule  # what serves (fp32 or int8): frozen and optimised unless handler.optimize is false
    device: torch.device
    golden: list  # golden inputs with the answers the exporter saw from the model that serves
    precision: str = "fp32"


def read_int8(path: Path, fp32: Artifact) -> tuple[Artifact, dict]:
    """The int8 variant of ``fp32`` and its quantization.json; sets torch's quantised engine to the one it was made for."""
    if not path.is_file():
        raise SpecError(f"handler.precision is int8 but the archive has no {path.name}: export it with "
                        "`python -m scripts.train.export` (writes <stem>.int8.pt beside the model) and package again "
                        "(scripts/deploy/package.py includes it), or set precision: fp32")
    text = read_extra_file(path, QUANTIZATION_FILENAME)
    if not text:
        raise SpecError(f"{path.name} carries no {QUANTIZATION_FILENAME}: it was not written by scripts/train/export.py")
    info = json.loads(text)
    engine = info.get("engine")
    if engine not in torch.backends.quantized.supported_engines:
        raise SpecError(f"{path.name} was quantised for the {engine!r} engine, which this torch build does not support "
                        f"(supported: {', '.join(torch.backends.quantized.supported_engines)}); set precision: fp32")
    torch.backends.quantized.engine = engine  # before loading: the int8 weights are packed for it at load
    artifact = read_model(path, sidecars=False)
    if artifact.spec != fp32.spec:
        raise SpecError(f"{path.name} carries another spec.json than the fp32 model: it was exported from another "
                        "model; export both again with `python -m scripts.train.export`")
    if fp32.golden and not artifact.golden:
        raise SpecError(f"{path.name} carries no {GOLDEN_FILENAME}; export it again with `python -m scripts.train.export`")
    return artifact, info


def load(context) -> Loaded:
    """Everything ``initialize()`` needs, from TorchServe's context."""
    model_dir = Path(context.system_properties["model_dir"])
    serialized = context.manifest["model"].get("serializedFile")
    if not serialized or not serialized.endswith(".pt"):
        raise SpecError(f"the archive's serialized file must be a TorchScript .pt file; got {serialized!r}")
    artifact = read_model(model_dir / serialized, model_dir)
    spec = artifact.spec

    yaml_config = getattr(context, "model_yaml_config", None) or {}
    settings = dict(yaml_config.get("handler") or {})
    worker_settings = {k: settings.pop(k) for k in WORKER_KEYS if k in settings}
    spec = spec.with_overrides(settings)
    precision = worker_settings.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise SpecError(f"handler.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    optimize = worker_settings.get("optimize", True)
    if not isinstance(optimize, bool):
        raise SpecError(f"handler.optimize must be true or false; got {optimize!r}")

    workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
    threads = resolve_threads(worker_settings.get("threads", "auto"), workers)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)  # canonicalisation's OpenCV calls share the worker's cores like torch
    decode.threads(threads)  # and so do the AVIF and HEIF decoders

    gpu_id = context.system_properties.get("gpu_id")
    device = torch.device(f"cuda:{gpu_id}") if torch.cuda.is_available() and gpu_id is not None else torch.device("cpu")
    if precision == "int8" and device.type != "cpu":
        logger.warning("handler.precision is int8, but torch's int8 kernels run on the CPU only: serving fp32 on %s", device)
        precision = "fp32"
    model, golden, how = artifact.model.to(device).eval(), artifact.golden, ""
    if precision == "int8":
        int8, info = read_int8(int8_path(model_dir / serialized), artifact)
        model, golden = int8.model.eval(), int8.golden
        how = f" ({info.get('engine')} engine)"
    if spec.ood.method == "features" and not has_method(model, "forward_features"):
        raise SpecError("spec.ood.method is 'features' but the model has no forward_features method; "
                        "export it with one (see scripts/train/model.py) or use method 'energy'")
    if spec.ood.method == "features" and artifact.ood is None:
        raise SpecError(f"spec.ood.method is 'features' but the model carries no {OOD_FILENAME}; "
                        "export it with scripts/train/export.py or use method 'energy'")

    check_model(model, spec, device)  # the model as exported: refuse dropout left on before anything else
    # int8 too: its BatchNorms are already folded, but freezing inlines the packed weights; measured
    # slightly faster than as exported (python -m scripts.train.quantize, docs/int8.md), same answers.
    if optimize:
        model = optimized(model, spec, device)
        check_model(model, spec, device)
    logger.info(
        "Loaded %s (%d classes, input %s, TTA %s, merge %s) on %s with %d thread(s): serving %s%s, %s",
        serialized, spec.num_classes, spec.input_size, list(spec.tta), spec.merge, device, threads, precision, how,
        "optimised for inference" if optimize else "as exported",
    )
    return Loaded(artifact._replace(spec=spec), model, device, golden, precision)
