"""An int8 variant of the served classifier: PyTorch's post-training static quantisation (FX graph mode).

The exporter (``scripts.train.export``) calls, in order:

1. ``quantize(eager, calibration)``: the fp32 model's ``forward_features`` traced by FX,
   the x86 engine's default qconfig mapping (per-channel symmetric int8 weights,
   histogram-calibrated uint8 activations with the reduced range x86 kernels without
   VNNI need; the embedding's means and concatenation and the last Linear stay in float:
   ``FLOAT_OPS``, ``FLOAT_MODULES``), calibrated on the training split as the server
   preprocesses it, then converted and scripted as an ``Int8Classifier`` that offers ``forward`` and
   ``forward_features`` like the fp32 model (the out-of-distribution detector reads the
   int8 model's embedding);
2. ``evaluate(fp32, int8, sets, spec, ood_params)``: top-1 agreement and accuracy of both
   models with TTA off and as served (the spec's TTA policy), and the agreement of the
   out-of-distribution flag, on every evaluation set;
3. ``shortfalls(figures, thresholds)``: every figure that misses its threshold, and by
   how much; the exporter refuses to write the int8 file unless there are none.

``quantization.json`` (``record``) travels in the int8 file with the figures.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from handler.inference import Policy, classify
from handler.spec import ModelSpec

ENGINE = "x86"
# Left in float (their inputs dequantised) instead of the default mapping's int8: the per-block
# means and the concatenation that make the out-of-distribution detector's embedding. Quantised,
# every mean is rounded to its block's activation step and the concatenation forces one scale on
# all four layers; the detector's Mahalanobis distances then move enough to flag ~2 points more
# in-distribution images than fp32 (measured: flag agreement 96-98 % instead of 99-100 %).
FLOAT_OPS = ("mean", "cat")
# Submodules of the fp32 model left in float: the classifier's last Linear (128 -> 10). Quantised, its
# output (the logits) comes in steps of one scale (~0.07), so two classes can tie exactly (3 of 701
# held-out images, 15 of 3505 photos) and the answer then depends on how a tie is broken (argmax and
# top-k disagreed on one); probabilities, "uncertain" and the energy part of the OOD score get coarse.
# In float it costs nothing measurable (1280 multiply-adds).
FLOAT_MODULES = ("out",)


@dataclass(frozen=True)
class Thresholds:
    """What an int8 model must reach on every evaluation set to be written."""

    min_agreement: float = 0.99  # top-1 agreement with the fp32 model (share of images)
    max_accuracy_drop: float = 0.3  # accuracy points (percent) the int8 model may lose against fp32
    min_ood_agreement: float = 0.97  # share of images whose out_of_distribution flag is the same


class _Features(nn.Module):
    """What FX traces: the fp32 model's single pass to (logits, embedding, feature map)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):  # no annotation: FX would copy the string "torch.Tensor" into the graph's code
        return self.model.forward_features(x)


class Int8Classifier(nn.Module):
    """The quantised graph behind the fp32 model's interface: ``forward`` -> logits,
    ``forward_features`` -> (logits, embedding, feature map), all float tensors."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net  # the converted FX GraphModule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, embedding, feature_map = self.net(x)
        return logits, embedding, feature_map


def quantize(eager: nn.Module, calibration: torch.Tensor, engine: str = ENGINE,
             batch_size: int = 256) -> torch.jit.ScriptModule:
    """The scripted int8 model, calibrated on ``calibration`` (N, C, H, W) as the server preprocesses images."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantised engine {engine!r} is not supported by this torch build "
                           f"({', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # FX graph mode announces its move to torchao on every call
        warnings.simplefilter("ignore")
        prepared = prepare_fx(_Features(copy.deepcopy(eager)).eval(), qconfig_mapping(engine),
                              example_inputs=(calibration[:2],))
        with torch.inference_mode():
            for i in range(0, len(calibration), batch_size):
                prepared(calibration[i : i + batch_size])
        graph = convert_fx(prepared)
        scripted = torch.jit.script(Int8Classifier(graph).eval())
    return scripted.eval()


def qconfig_mapping(engine: str = ENGINE):
    """The engine's default mapping (per-channel weights), with ``FLOAT_OPS`` and ``FLOAT_MODULES`` left in float."""
    from torch.ao.quantization import get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(engine)
    for op in FLOAT_OPS:
        mapping.set_object_type(torch.cat if op == "cat" else op, None)
    for name in FLOAT_MODULES:
        mapping.set_module_name(f"model.{name}", None)  # _Features holds the fp32 model as .model
    return mapping


def qconfig_description(engine: str = ENGINE) -> dict:
    """The global qconfig of the mapping, in words (for quantization.json)."""
    qconfig = qconfig_mapping(engine).global_qconfig

    def describe(factory) -> dict:
        with warnings.catch_warnings():  # the x86 activation observer's reduce_range is announced as deprecated
            warnings.simplefilter("ignore")
            observer = factory()
        return {"observer": type(observer).__name__, "dtype": str(observer.dtype).replace("torch.", ""),
                "qscheme": str(observer.qscheme).replace("torch.", ""),
                "reduce_range": bool(getattr(observer, "reduce_range", False))}

    return {"mapping": f"get_default_qconfig_mapping({engine!r})", "float_ops": list(FLOAT_OPS),
            "float_modules": list(FLOAT_MODULES),
            "activation": describe(qconfig.activation), "weight": describe(qconfig.weight)}


def compare(fp32_pred, int8_pred, labels=None) -> dict:
    """Top-1 agreement of two models' predictions, and each one's accuracy (in points) when labels are given."""
    a, b = np.asarray(fp32_pred), np.asarray(int8_pred)
    out = {"n": int(len(a)), "agreement": round(float((a == b).mean()), 5)}
    if labels is not None:
        y = np.asarray(labels)
        acc_a, acc_b = 100.0 * float((a == y).mean()), 100.0 * float((b == y).mean())
        out.update(accuracy_fp32=round(acc_a, 3), accuracy_int8=round(acc_b, 3),
                   accuracy_drop=round(acc_a - acc_b, 3))
    return out


def evaluate(fp32, int8, sets: dict, spec: ModelSpec, ood_params: dict | None, batch_size: int = 512) -> dict:
    """Figures per set: ``sets`` maps a name to (x, signals, labels or None for outliers).

    For labelled sets: ``compare`` with TTA off and with the spec's TTA policy; for every set
    with signals and a detector: the share of images whose out_of_distribution flag agrees.
    """
    policy = Policy.from_spec(spec, ood_params)
    figures = {}
    for name, (x, signals, labels) in sets.items():
        entry = {"n": len(x)}
        answers = {}
        for model_name, model in (("fp32", fp32), ("int8", int8)):
            for tta in (False, True):
                parts = []
                for i in range(0, len(x), batch_size):
                    chunk = x[i : i + batch_size]
                    s = None if signals is None else signals[i : i + batch_size]
                    parts.append(classify(model, chunk, torch.full((len(chunk),), tta, dtype=torch.bool), policy, s))
                answers[model_name, tta] = (torch.cat([p.probs for p in parts]).argmax(1).numpy(),
                                            None if parts[0].ood is None else torch.cat([p.ood for p in parts]).numpy())
        if labels is not None:
            entry["tta_off"] = compare(answers["fp32", False][0], answers["int8", False][0], labels)
            entry["tta_on"] = compare(answers["fp32", True][0], answers["int8", True][0], labels)
        flags_fp32, flags_int8 = answers["fp32", True][1], answers["int8", True][1]
        if flags_fp32 is not None:
            entry["ood"] = {"agreement": round(float((flags_fp32 == flags_int8).mean()), 5),
                            "flagged_fp32": round(float(flags_fp32.mean()), 5),
                            "flagged_int8": round(float(flags_int8.mean()), 5)}
        figures[name] = entry
    return figures


def shortfalls(figures: dict, thresholds: Thresholds) -> list[str]:
    """Every figure of ``evaluate`` that misses ``thresholds``, saying by how much; empty when all pass."""
    out = []
    for name, entry in figures.items():
        for key, label in (("tta_off", "TTA off"), ("tta_on", "TTA on")):
            if key not in entry:
                continue
            f = entry[key]
            if f["agreement"] < thresholds.min_agreement:
                out.append(f"{name}, {label}: top-1 agreement with fp32 {f['agreement']:.2%} is "
                           f"{100 * (thresholds.min_agreement - f['agreement']):.2f} points below the "
                           f"{thresholds.min_agreement:.2%} required (n={f['n']})")
            if "accuracy_drop" in f and f["accuracy_drop"] > thresholds.max_accuracy_drop + 1e-9:
                out.append(f"{name}, {label}: accuracy drops {f['accuracy_drop']:.2f} points "
                           f"({f['accuracy_fp32']:.2f}% -> {f['accuracy_int8']:.2f}%), "
                           f"{f['accuracy_drop'] - thresholds.max_accuracy_drop:.2f} more than the "
                           f"{thresholds.max_accuracy_drop} allowed (n={f['n']})")
        if "ood" in entry and entry["ood"]["agreement"] < thresholds.min_ood_agreement:
            o = entry["ood"]
            out.append(f"{name}: out_of_distribution flag agrees with fp32 on {o['agreement']:.2%} of images, "
                       f"{100 * (thresholds.min_ood_agreement - o['agreement']):.2f} points below the "
                       f"{thresholds.min_ood_agreement:.2%} required (fp32 flags {o['flagged_fp32']:.2%}, "
                       f"int8 {o['flagged_int8']:.2%})")
    return out


def record(figures: dict, thresholds: Thresholds, engine: str, calibration: dict, evaluation: dict) -> dict:
    """``quantization.json``: how the int8 model was made and how it compares with fp32.

    ``evaluation`` says what the sets of ``figures`` are and which TTA policy ``tta_on`` used.
    Accuracies and ``accuracy_drop`` are in points (percent), agreements are shares.
    """
    return {
        "engine": engine,
        "qconfig": qconfig_description(engine),
        "workflow": "torch.ao.quantization.quantize_fx prepare_fx / convert_fx (post-training static), torch.jit.script",
        "calibration": calibration,
        "thresholds": asdict(thresholds),
        "evaluation": evaluation,
        "figures": figures,
        "torch": torch.__version__,
    }


def summary_lines(figures: dict) -> list[str]:
    """The figures, one line per set, for the exporter's output."""
    lines = []
    for name, entry in figures.items():
        parts = []
        for key, label in (("tta_off", "TTA off"), ("tta_on", "TTA on")):
            if key in entry:
                f = entry[key]
                parts.append(f"{label}: agreement {f['agreement']:.2%}, accuracy {f['accuracy_fp32']:.2f}% fp32 / "
                             f"{f['accuracy_int8']:.2f}% int8")
        if "ood" in entry:
            parts.append(f"OOD flag agreement {entry['ood']['agreement']:.2%} (flagged {entry['ood']['flagged_fp32']:.1%} "
                         f"fp32 / {entry['ood']['flagged_int8']:.1%} int8)")
        lines.append(f"  {name} (n={entry['n']}): " + "; ".join(parts))
    return lines


# --- timing: python -m scripts.train.quantize ----------------------------------------------------------

def get_args_parser():
    import argparse

    from scripts.train.data import REPO

    p = argparse.ArgumentParser(description="In-process forward_features time of the fp32 and int8 models, "
                                            "as exported and as handler/loader.py can serve them.")
    p.add_argument("--model", default=str(REPO / "models" / "fashion_cnn.pt"), help="the fp32 file; int8: <stem>.int8.pt")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the shipped config: 1 per worker)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per variant and batch size")
    return p


def time_variants(variants: dict, batch: int, spec: ModelSpec, seconds: float) -> dict:
    """Median ms of ``forward_features`` per variant, measured in interleaved rounds so drift hits all alike."""
    import time

    c, (h, w) = spec.channels, spec.input_size
    x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for model in variants.values():  # warm up (first calls of a scripted model optimise its graph)
            for _ in range(10):
                model.forward_features(x)
        deadline = time.perf_counter() + seconds * len(variants)
        while time.perf_counter() < deadline:
            for name, model in variants.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    model.forward_features(x)
                times[name].append((time.perf_counter() - t0) / 5)
    return {name: round(1000 * float(np.median(t)), 3) for name, t in times.items()}


def main(args) -> dict:
    from pathlib import Path

    from handler.loader import int8_path, optimized, read_int8, read_model

    torch.set_num_threads(args.threads)
    fp32 = read_model(Path(args.model))
    int8, info = read_int8(int8_path(Path(args.model)), fp32)
    cpu = torch.device("cpu")
    variants = {"fp32 as exported": fp32.model, "fp32 frozen + optimised": optimized(fp32.model, fp32.spec, cpu),
                "int8 as exported": int8.model, "int8 frozen + optimised": optimized(int8.model, int8.spec, cpu)}
    result = {}
    print(f"forward_features, median ms per call, {args.threads} thread(s), torch {torch.__version__}, "
          f"engine {info['engine']}")
    for batch in (int(b) for b in args.batches.split(",")):
        result[batch] = time_variants(variants, batch, fp32.spec, args.seconds)
        print(f"batch {batch}: " + ", ".join(f"{name} {ms:.3f}" for name, ms in result[batch].items()))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
