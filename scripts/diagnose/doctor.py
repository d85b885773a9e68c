"""Diagnose a TorchScript classifier: one verdict per check, with its evidence.

    make doctor MODEL=models/fashion_cnn.pt [SPEC=spec.json] [DATA=dir]
    python -m scripts.diagnose.doctor --model my_model.pt --spec spec.json --data my_images/

Checks (exit 0 when all pass, 1 otherwise; a check that cannot run is reported as skipped and
fails nothing by itself):

- **input shape**: a (N, C, H, W) batch of the spec's size maps to (N, K) outputs, K = the spec's
  classes; otherwise the doctor finds what the model does accept and names it (another size, other
  channels, a single image without its batch dimension, a batch of one squeezed to (K,));
- **eval mode**: two passes over the same batch must agree exactly (dropout or batch-norm left in
  training mode), with the submodules still in training mode as evidence;
- **logits**: outputs whose rows are non-negative and sum to 1 are probabilities: the handler's
  softmax would be applied a second time and every confidence flattened;
- **normalisation**: accuracy on labelled reference images under the spec's mean/std vs common
  alternatives ([0,1], [-1,1], 0-255, ImageNet mean/std), failed when an alternative is clearly
  better (by at least 5 points);
- **channel order and polarity**: the same with inverted intensities and, for 3 channels, BGR;
- **collapse**: the share of the most frequent predicted class and the entropy of the predicted
  class distribution, against the labels'.

The reference images are the shared Fashion-MNIST subset's held-out split by default (when the spec's
classes are its classes), or ``--data`` (IDX files or a class-per-folder tree named like the spec's
classes), brought to the model's size and mode by the server's own canonicalisation. Figures (first-layer
filters, each convolutional block's feature maps for a sample, confusion matrix, heatmaps from
``handler.explain``) and report.{json,md} go to build/doctor/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from handler.errors import SpecError
from handler.explain import Explainer
from handler.loader import read_model
from handler.preprocess import canonical_image
from handler.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from handler.tta import background_fill
from scripts.train.data import DEFAULT_DATA, REPO, load_dataset, split

CLEARLY_BETTER = 0.05  # an alternative input convention this much more accurate than the spec's is the model's
PROBE_SIZES = (8, 16, 28, 32, 48, 64, 96, 112, 128, 160, 224, 256, 299)


@dataclass
class Verdict:
    check: str
    ok: bool | None  # None: skipped (could not run)
    summary: str
    evidence: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a TorchScript classifier (.pt)")
    p.add_argument("--spec", type=Path, default=None, help="spec.json (default: the one inside the model file or beside it)")
    p.add_argument("--data", type=Path, default=None,
                   help="labelled reference images: IDX files or a class-per-folder tree (default: the shared "
                        "Fashion-MNIST subset's held-out split, when the spec's classes are its classes)")
    p.add_argument("--limit", type=int, default=500, help="reference images used (stratified by the split)")
    p.add_argument("--out", type=Path, default=REPO / "build" / "doctor")
    p.add_argument("--no-figures", action="store_true", help="skip the figures (the checks and report only)")
    return p


# --- loading ----------------------------------------------------------------------------------------------


def load(model_path: Path, spec_path: Path | None) -> tuple[torch.jit.ScriptModule, ModelSpec]:
    if spec_path is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(model_path), map_location="cpu")
        return model, ModelSpec.from_json(spec_path.read_text())
    artifact = read_model(model_path)
    return artifact.model, artifact.spec


def reference(spec: ModelSpec, data: Path | None, limit: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(uint8 images in the model's mode and size, labels as the spec's class indices, source) or None."""
    path = data or DEFAULT_DATA
    if not path.is_dir():
        return None
    ds = load_dataset(path, spec)
    names = {n.lower(): i for i, n in enumerate(spec.class_names)}
    if not all(n.lower() in names for n in ds.class_names):
        if data is None:
            return None  # the default data set is Fashion-MNIST: not this model's classes
        raise SystemExit(f"doctor: the classes of {path} ({list(ds.class_names)[:6]}...) are not the spec's "
                         f"({list(spec.class_names)[:6]}...)")
    to_spec = np.array([names[n.lower()] for n in ds.class_names])
    rows = split(ds, seed=0).holdout if data is None else np.arange(len(ds))
    if len(rows) > limit:  # keep it stratified: every k-th row of the sorted split
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    images = []
    for img in ds.images[rows]:
        pil = Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB")
        images.append(np.asarray(canonical_image(pil, spec).image, dtype=np.uint8))
    return np.stack(images), to_spec[ds.labels[rows]], f"{path} ({'held-out split, ' if data is None else ''}{len(rows)} images)"


def as_unit(images: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 (N, H, W[, 3]) -> float (N, C, H, W) in [0, 1]."""
    x = torch.from_numpy(images).float().div(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
    return x.contiguous()


def normalise(unit: torch.Tensor, mean, std) -> torch.Tensor:
    c = unit.shape[1]
    m = torch.tensor(list(mean) * (c if len(mean) == 1 else 1), dtype=torch.float32)[:c].view(1, -1, 1, 1)
    s = torch.tensor(list(std) * (c if len(std) == 1 else 1), dtype=torch.float32)[:c].view(1, -1, 1, 1)
    return (unit - m) / s


def conventions(spec: ModelSpec) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Input conventions as (mean, std) applied to [0, 1] pixels; the spec's first."""
    grey_mean, grey_std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    out = {"spec": (tuple(spec.mean), tuple(spec.std)), "[0,1]": ((0.0,), (1.0,)), "[-1,1]": ((0.5,), (0.5,)),
           "0-255": ((0.0,), (1 / 255.0,)),
           "ImageNet mean/std": (IMAGENET_MEAN, IMAGENET_STD) if spec.channels == 3 else (grey_mean, grey_std)}
    spec_pair = out["spec"]
    return {k: v for k, v in out.items() if k == "spec" or not _same(v, spec_pair, spec.channels)}


def _same(a, b, channels) -> bool:
    def expand(v):
        return list(v) * (channels if len(v) == 1 else 1)

    return np.allclose(expand(a[0]), expand(b[0]), atol=1e-3) and np.allclose(expand(a[1]), expand(b[1]), atol=1e-3)


def predict(model, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + chunk]).float() for i in range(0, len(x), chunk)])


# --- checks -----------------------------------------------------------------------------------------------


def _runs(model, x) -> torch.Tensor | None:
    try:
        with torch.inference_mode():
            out = model(x)
        return out if isinstance(out, torch.Tensor) else None
    except Exception:  # noqa: BLE001 - any failure means "does not run on this shape"
        return None


def check_shape(model, spec: ModelSpec) -> Verdict:
    c, (h, w), k = spec.channels, spec.input_size, spec.num_classes
    x = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(0))
    out = _runs(model, x)
    evidence = {"spec_input": [c, h, w], "spec_classes": k}
    if out is not None and tuple(out.shape) == (4, k):
        one = _runs(model, x[:1])
        if one is not None and tuple(one.shape) == (k,):
            return Verdict("input shape", False, f"a batch of one comes back as {tuple(one.shape)}, not (1, {k}): "
                           "the model squeezes the batch dimension away (use flatten(1), not squeeze())", evidence)
        return Verdict("input shape", True, f"(N, {c}, {h}, {w}) -> (N, {k}) as the spec says", evidence)
    if out is not None:
        evidence["output_shape"] = list(out.shape)
        if out.ndim == 2 and out.shape[0] == 4:
            return Verdict("input shape", False, f"the model outputs {out.shape[1]} classes, the spec names {k}", evidence)
        return Verdict("input shape", False, f"(4, {c}, {h}, {w}) -> {tuple(out.shape)}, expected (4, {k})", evidence)
    single = _runs(model, x[0])
    if single is not None and single.numel() == k:
        return Verdict("input shape", False, f"missing batch dimension: the model takes one ({c}, {h}, {w}) image "
                       f"and returns {tuple(single.shape)}, but fails on a (N, {c}, {h}, {w}) batch", evidence)
    accepted = []
    for channels in dict.fromkeys((c, 1, 3)):
        for size in PROBE_SIZES:
            got = _runs(model, torch.zeros(2, channels, size, size))
            if got is not None and got.ndim == 2 and got.shape[0] == 2:
                accepted.append([channels, size, size])
    evidence["accepts"] = accepted
    if not accepted:
        return Verdict("input shape", False, f"the model fails on ({c}, {h}, {w}) and on every probed size "
                       f"({', '.join(map(str, PROBE_SIZES))}) with 1 or 3 channels", evidence)
    same_channels = [a for a in accepted if a[0] == c]
    if same_channels:
        sizes = ", ".join(f"{a[1]}x{a[2]}" for a in same_channels)
        return Verdict("input shape", False, f"wrong input size: the model runs on {sizes} inputs, the spec says "
                       f"{h}x{w} (set spec.input_size)", evidence)
    chans = sorted({a[0] for a in accepted})
    return Verdict("input shape", False, f"wrong channels: the model takes {chans} channel(s), the spec says {c} "
                   "(set spec.channels)", evidence)


def check_eval_mode(model, spec: ModelSpec) -> Verdict:
    c, (h, w) = spec.channels, spec.input_size
    x = torch.randn(8, c, h, w, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        first, second = model(x), model(x)
    training = [f"{name or '(model)'} ({getattr(m, 'original_name', type(m).__name__)})"
                for name, m in model.named_modules() if m.training]
    diff = float((first - second).abs().max())
    evidence = {"max_abs_diff": diff, "modules_in_training_mode": training[:20]}
    if diff > 0:
        where = f"; in training mode: {', '.join(training[:5])}" if training else ""
        return Verdict("eval mode", False, f"two passes over the same batch differ (max |diff| {diff:.3g}): dropout or "
                       f"batch-norm is in training mode{where}. Call model.eval() before torch.jit.script", evidence)
    return Verdict("eval mode", True, "two passes over the same batch agree exactly", evidence)


def check_logits(outputs: torch.Tensor) -> Verdict:
    sums = outputs.sum(dim=1)
    evidence = {"min": round(float(outputs.min()), 4), "max": round(float(outputs.max()), 4),
                "row_sum_min": round(float(sums.min()), 4), "row_sum_max": round(float(sums.max()), 4)}
    if bool((outputs >= -1e-6).all()) and bool(((sums - 1).abs() < 1e-3).all()):
        return Verdict("logits", False, "the outputs are probabilities (non-negative, every row sums to 1): the "
                       "handler's softmax would be applied twice and confidences flattened. Return logits "
                       "(drop the final softmax)", evidence)
    lse = torch.logsumexp(outputs, dim=1)
    if bool((outputs <= 1e-6).all()) and bool((lse.abs() < 1e-3).all()):
        return Verdict("logits", True, "the outputs are log-probabilities: softmax of them is the same distribution",
                       evidence)
    return Verdict("logits", True, f"logits: range [{evidence['min']}, {evidence['max']}], rows do not sum to 1", evidence)


def accuracy(model, x: torch.Tensor, labels: np.ndarray) -> tuple[float, np.ndarray]:
    pred = predict(model, x).argmax(dim=1).numpy()
    return float((pred == labels).mean()), pred


def compare(name: str, scores: dict[str, float], what: str) -> Verdict:
    base = scores["spec"]
    best = max((k for k in scores if k != "spec"), key=scores.get, default=None)
    evidence = {"accuracy": {k: round(v, 4) for k, v in scores.items()}}
    table = ", ".join(f"{k} {v * 100:.1f} %" for k, v in scores.items())
    if best is not None and scores[best] >= base + CLEARLY_BETTER:
        return Verdict(name, False, f"{what} {best!r} gives {scores[best] * 100:.1f} % accuracy against the spec's "
                       f"{base * 100:.1f} %: the model was trained with {best} ({table})", evidence)
    return Verdict(name, True, f"the spec's convention is the best or within {CLEARLY_BETTER * 100:.0f} points ({table})",
                   evidence)


def check_collapse(pred: np.ndarray, labels: np.ndarray, k: int) -> Verdict:
    def stats(values):
        counts = np.bincount(values, minlength=k) / len(values)
        nz = counts[counts > 0]
        return float(counts.max()), int(counts.argmax()), float(-(nz * np.log2(nz)).sum())

    top, cls, entropy = stats(pred)
    label_top, _, label_entropy = stats(labels)
    evidence = {"top_class": cls, "top_share": round(top, 4), "entropy_bits": round(entropy, 3),
                "labels_top_share": round(label_top, 4), "labels_entropy_bits": round(label_entropy, 3),
                "max_entropy_bits": round(math.log2(k), 3)}
    text = (f"most frequent prediction class {cls} on {top * 100:.1f} % of images (labels: {label_top * 100:.1f} %), "
            f"entropy {entropy:.2f} bits (labels: {label_entropy:.2f})")
    if top > max(0.5, 2 * label_top) or entropy < 0.5 * label_entropy:
        return Verdict("collapse", False, f"predictions collapse: {text}", evidence)
    return Verdict("collapse", True, text, evidence)


def diagnose(model, spec: ModelSpec, ref) -> tuple[list[Verdict], dict]:
    verdicts = [check_shape(model, spec)]
    extras = {}
    if not verdicts[0].ok:
        reason = "the model does not run on the spec's input (see input shape)"
        return verdicts + [Verdict(n, None, reason) for n in ("eval mode", "logits", "normalisation",
                                                                "channel order and polarity", "collapse")], extras
    verdicts.append(check_eval_mode(model, spec))
    if ref is None:
        c, (h, w) = spec.channels, spec.input_size
        noise = torch.rand(64, c, h, w, generator=torch.Generator().manual_seed(2))
        verdicts.append(check_logits(predict(model, normalise(noise, spec.mean, spec.std))))
        reason = "no labelled reference images for the spec's classes (pass --data)"
        return verdicts + [Verdict(n, None, reason) for n in ("normalisation", "channel order and polarity", "collapse")], extras
    images, labels, source = ref
    unit = as_unit(images, spec.channels)
    served = normalise(unit, spec.mean, spec.std)
    outputs = predict(model, served)
    verdicts.append(check_logits(outputs))
    preds = {"spec": outputs.argmax(dim=1).numpy()}
    transforms = {"inverted intensities": lambda u: 1 - u}
    if spec.channels == 3:
        transforms["BGR"] = lambda u: u.flip(1)
    variants = {"spec": float((preds["spec"] == labels).mean())}
    for name, change in transforms.items():
        variants[name], preds[name] = accuracy(model, normalise(change(unit), spec.mean, spec.std), labels)
    order = compare("channel order and polarity", variants, "the variant")
    if spec.channels == 3 and bool((unit[:, 0] == unit[:, 1]).all() and (unit[:, 1] == unit[:, 2]).all()):
        order.summary += " (the reference images are grey: channel order cannot be told apart on them)"
    # One fault, one verdict: a model that fits another polarity or channel order is scored under it for the
    # normalisation too (under the spec's polarity every convention is poor, and one is merely less poor).
    fitted = max(transforms, key=variants.get) if order.ok is False else None
    unit_fitted = transforms[fitted](unit) if fitted else unit
    scores = {"spec": variants[fitted] if fitted else variants["spec"]}
    for name, (mean, std) in tqdm(list(conventions(spec).items())[1:], desc="normalisations", leave=False):
        scores[name], pred = accuracy(model, normalise(unit_fitted, mean, std), labels)
        if not fitted:
            preds[name] = pred
    normalisation = compare("normalisation", scores, "the input convention")
    if fitted:
        normalisation.summary += f" (measured with {fitted}, which the model fits)"
        normalisation.evidence["measured_under"] = fitted
        scores = {"spec": variants["spec"]}  # the collapse check below judges the variants alone
    verdicts += [normalisation, order]
    # A model fed the wrong convention often looks collapsed too; judge collapse under the convention it fits,
    # so that one fault gets one verdict.
    fits = max(scores | variants, key=(scores | variants).get)
    fits = fits if (scores | variants)[fits] >= scores["spec"] + CLEARLY_BETTER else "spec"
    collapse = check_collapse(preds[fits], labels, spec.num_classes)
    if fits != "spec":
        collapse.summary += f" (measured under {fits}, the input convention the model fits)"
        collapse.evidence["measured_under"] = fits
    verdicts.append(collapse)
    extras.update(source=source, accuracy=scores["spec"], predictions=preds["spec"], labels=labels,
                  images=images, served=served)
    return verdicts, extras


# --- figures ----------------------------------------------------------------------------------------------


def figures(out: Path, model, spec: ModelSpec, extras: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    weight = next((p.detach() for _, p in model.named_parameters() if p.ndim == 4), None)
    if weight is not None:
        n = min(32, weight.shape[0])
        cols = 8
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(cols * 1.0, math.ceil(n / cols) * 1.0), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(weight[i].mean(dim=0).numpy(), cmap="coolwarm")
        fig.suptitle(f"first convolution: {n} of {weight.shape[0]} filters (mean over input channels)", fontsize=8)
        fig.savefig(out / "filters.png", dpi=100)
        plt.close(fig)
        written.append("filters.png")
    served = extras.get("served")
    if served is None:
        return written
    sample = served[:1]
    maps = block_outputs(model, sample)
    if maps:
        fig, axes = plt.subplots(len(maps), 9, figsize=(9 * 1.0, len(maps) * 1.1), squeeze=False)
        for r, (name, fmap) in enumerate(maps):
            axes[r, 0].imshow(extras["images"][0], cmap="gray")
            axes[r, 0].set_ylabel(name, fontsize=7)
            for c in range(1, 9):
                if c - 1 < fmap.shape[1]:
                    axes[r, c].imshow(fmap[0, c - 1].numpy(), cmap="viridis")
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle("feature maps of each convolutional block (first 8 channels) for a reference image", fontsize=8)
        fig.savefig(out / "feature_maps.png", dpi=100)
        plt.close(fig)
        written.append("feature_maps.png")
    k = spec.num_classes
    if k <= 50:
        matrix = np.zeros((k, k), dtype=int)
        np.add.at(matrix, (extras["labels"], extras["predictions"]), 1)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(matrix, cmap="Blues")
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=6)
        ax.set_xticks(range(k), spec.class_names, rotation=60, fontsize=6)
        ax.set_yticks(range(k), spec.class_names, fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("label")
        ax.set_title(f"confusion matrix (accuracy {extras['accuracy'] * 100:.1f} %)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "confusion_matrix.png", dpi=100)
        plt.close(fig)
        written.append("confusion_matrix.png")
    explainer = Explainer.build(model, spec, background_fill(spec))
    picks = served[:6]
    classes = torch.as_tensor(extras["predictions"][:6])
    heat = explainer.heatmaps(picks, classes).numpy()
    fig, axes = plt.subplots(2, len(picks), figsize=(len(picks) * 1.4, 3.0), squeeze=False)
    for i in range(len(picks)):
        axes[0, i].imshow(extras["images"][i], cmap="gray")
        axes[0, i].set_title(spec.class_names[int(classes[i])][:12], fontsize=7)
        axes[1, i].imshow(extras["images"][i], cmap="gray")
        axes[1, i].imshow(heat[i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(f"{explainer.method} (handler.explain) for the predicted class", fontsize=8)
    fig.savefig(out / "explanations.png", dpi=100)
    plt.close(fig)
    written.append("explanations.png")
    return written


def block_outputs(model, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Each convolutional block's output: the FashionCNN layout (``blocks``), else forward_features' map, else none."""
    with torch.inference_mode():
        if hasattr(model, "blocks"):
            out, h = [], x
            for name, block in model.blocks.named_children():
                h = block(h)
                out.append((f"block {int(name) + 1}" if name.isdigit() else name, h))
            return out
        if hasattr(model, "forward_features"):
            return [("feature map", model.forward_features(x)[2])]
    return []


# --- report -----------------------------------------------------------------------------------------------


def report(out: Path, model_path: Path, verdicts: list[Verdict], extras: dict, written: list[str]) -> None:
    doc = {"model": str(model_path), "reference": extras.get("source"), "passed": all(v.ok is not False for v in verdicts),
           "checks": [asdict(v) | {"status": v.status} for v in verdicts], "figures": written}
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# doctor: {model_path}", "", f"Reference images: {extras.get('source') or 'none'}", "",
             "| check | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {v.check} | {v.status} | {v.summary} |" for v in verdicts]
    lines += [""] + [f"![{name}]({name})" for name in written] + [""]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        model, spec = load(args.model, args.spec)
    except (SpecError, RuntimeError, ValueError, OSError) as exc:
        print(f"doctor: cannot load {args.model}: {exc}", file=sys.stderr)
        return 1
    # the model is judged as saved (no .eval() here): a model exported in training mode must be caught
    ref = reference(spec, args.data, args.limit)
    verdicts, extras = diagnose(model, spec, ref)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [] if args.no_figures or not verdicts[0].ok else figures(args.out, model, spec, extras)
    report(args.out, args.model, verdicts, extras, written)
    print(f"doctor: {args.model} ({spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}, {spec.num_classes} classes); "
          f"reference: {extras.get('source') or 'none'}")
    for v in verdicts:
        print(f"  {v.status}  {v.check}: {v.summary}")
    failed = [v.check for v in verdicts if v.ok is False]
    print(f"verdict: {'all checks pass' if not failed else 'FAILED: ' + ', '.join(failed)}; report: {args.out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
