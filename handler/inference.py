"""Batched, confidence-gated TTA inference: two forward passes at most, never a loop.

1. The identity view of every image in the batch goes through the model at once
   (``forward_features`` when the out-of-distribution detector reads the embedding).
2. The images that asked for TTA and that the spec's gate lets through (their identity
   answer is not confident; ``handler.tta.Gate``), plus those that asked for every view,
   get the policy's extra views, stacked view-major, in ONE second forward pass; their
   logits are merged per image.  With no gate every image that asked gets the views;
   when none qualifies the second pass is skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from handler.errors import SpecError
from handler.ood import Detector
from handler.preprocess import Prepared
from handler.spec import ModelSpec
from handler.tta import Gate, View, background_fill, expand, merge, parse_view


@dataclass(frozen=True)
class Policy:
    """The TTA views and merge rule, resolved once from the spec."""

    names: tuple[str, ...]
    views: tuple[View, ...]
    fill: torch.Tensor
    merge: str
    temperature: float
    detector: Detector | None = None
    gate: Gate | None = None  # None: every image that asks gets every view

    @classmethod
    def from_spec(cls, spec: ModelSpec, ood_params: dict | None = None) -> Policy:
        """The spec's policy; ``ood_params`` is the model's ood.json. Without it a features detector is
        left out (tools that only classify); the loader refuses to serve such a model."""
        needs_params = spec.ood.method == "features"
        return cls(
            names=spec.tta,
            views=tuple(parse_view(name) for name in spec.tta),
            fill=background_fill(spec),
            merge=spec.merge,
            temperature=float(spec.temperature),
            detector=None if needs_params and ood_params is None else Detector.build(spec.ood, float(spec.temperature), ood_params),
            gate=spec.tta_gate,
        )


@dataclass(frozen=True)
class BatchResult:
    probs: torch.Tensor  # (N, K) merged probabilities
    n_views: torch.Tensor  # (N,) views merged per image (1 where TTA was off)
    disagree: torch.Tensor  # (N,) bool: the views' top-1 classes differ
    view_probs: list[torch.Tensor]  # per image: (n_views, K) probabilities of each view
    ood_score: torch.Tensor | None = None  # (N,) higher = less like the training data (identity view)
    ood: torch.Tensor | None = None  # (N,) bool: flagged out of distribution
    ood_parts: dict[str, torch.Tensor] | None = None  # each part of the score, (N,)


def forward(model, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, embedding) in one pass; the embedding only when asked for (``forward_features``)."""
    with torch.inference_mode():
        if features:
            logits, embedding, _ = model.forward_features(x)
            return logits.float(), embedding
        return model(x).float(), None


def classify(model: torch.jit.ScriptModule | torch.nn.Module, x: torch.Tensor, use_tta: torch.Tensor, policy: Policy,
             signals: torch.Tensor | None = None, force: torch.Tensor | None = None) -> BatchResult:
    """Classify a batch ``x`` (N, C, H, W).

    ``use_tta`` (N,) bool: the images that may get the extra views (those the policy's gate
    lets through); ``force`` (N,) bool: the images that get them whatever the gate.
    ``signals`` (N, S) are the raw-image signals from canonicalisation; the out-of-distribution
    score is computed when the detector has what it needs (the features detector needs them when
    its combination reads them: a model served without canonicalisation has none and needs none).
    """
    n = x.shape[0]
    detector = policy.detector
    features = (detector is not None and detector.needs_features
                and (signals is not None or not detector.needs_signals))
    base, embedding = forward(model, x, features)
    probs = torch.softmax(base / policy.temperature, dim=-1)
    n_views = torch.ones(n, dtype=torch.long, device=base.device)
    disagree = torch.zeros(n, dtype=torch.bool, device=base.device)
    view_probs = list(probs.unsqueeze(1).unbind(0))  # one (1, K) view per image; replaced below where merged
    extra = policy.views[1:]
    wanted = use_tta if policy.gate is None else use_tta & policy.gate.opens(probs)
    if force is not None:
        wanted = wanted | force
    on = torch.nonzero(wanted, as_tuple=False).flatten()
    if extra and len(on):
        more, _ = forward(model, expand(x[on], list(extra), policy.fill), False)
        k = base.shape[-1]
        per_view = torch.cat([base[on].unsqueeze(0), more.view(len(extra), len(on), k)])  # (V, M, K)
        probs[on] = merge(per_view, policy.merge, policy.temperature)
        top1 = per_view.argmax(dim=-1)  # (V, M)
        disagree[on] = (top1 != top1[0:1]).any(dim=0)
        n_views[on] = per_view.shape[0]
        each = torch.softmax(per_view / policy.temperature, dim=-1)
        for j, i in enumerate(on.tolist()):
            view_probs[i] = each[:, j]
    result = BatchResult(probs, n_views, disagree, view_probs)
    if detector is not None and (features or not detector.needs_features):
        parts = detector.parts(base.cpu(), embedding.cpu() if features else None, signals)
        score = detector.score(parts)
        result = BatchResult(probs, n_views, disagree, view_probs, score, detector.flag(score), parts)
    return result


def check_model(model, spec: ModelSpec, device: torch.device = torch.device("cpu")) -> None:
    """Refuse to serve a model whose output shape or determinism is wrong.

    Two forward passes over the same random batch must agree exactly: a model
    exported with dropout (or BatchNorm) left in training mode fails here, at load
    time, instead of silently serving noisy predictions.
    """
    c, (h, w) = spec.channels, spec.input_size
    x = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        first, second = model(x), model(x)
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != (4, spec.num_classes):
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise SpecError(
            f"the model maps a (4, {c}, {h}, {w}) batch to {shape}; the spec expects (4, {spec.num_classes}) "
            "logits. Check spec.input_size, spec.channels and spec.class_names."
        )
    if not torch.equal(first, second):
        raise SpecError(
            "the model gives different outputs for the same input: dropout or batch-norm is in training "
            "mode. Call model.eval() before torch.jit.script and export again."
        )


@dataclass(frozen=True)
class ImageResult:
    probs: torch.Tensor  # (K,)
    n_views: int
    disagree: bool
    view_probs: torch.Tensor  # (n_views, K)
    ood_score: float | None = None
    ood: bool = False
    ood_parts: dict[str, float] | None = None
    explanation: dict | None = None  # /explanations: handler.explain's heatmaps for this image


def infer(model, slots: list, policy: Policy, device: torch.device | None = None) -> list:
    """Run every image of every prepared request in the batch through ``classify`` at once.

    ``slots`` is the preprocess stage's output; prepared requests are replaced by
    their list of ``ImageResult``, anything else (errors, describe) passes through.
    """
    owners, tensors, signals, tta, every = [], [], [], [], []
    for idx, slot in enumerate(slots):
        if isinstance(slot, Prepared):
            for tensor, signal, options in zip(slot.tensors, slot.signals, slot.options):
                owners.append(idx)
                tensors.append(tensor)
                signals.append(signal)
                tta.append(options.tta != "off")
                every.append(options.tta == "all")
    if not tensors:
        return list(slots)
    x = torch.stack(tensors)
    s = torch.stack(signals) if all(signal is not None for signal in signals) else None
    use_tta, force = torch.tensor(tta, dtype=torch.bool), torch.tensor(every, dtype=torch.bool)
    if device is not None and device.type != "cpu":
        x = x.to(device)
        policy = dataclasses.replace(policy, fill=policy.fill.to(device))
    result = classify(model, x, use_tta.to(x.device), policy, s, force.to(x.device))
    out = [slot if not isinstance(slot, Prepared) else [] for slot in slots]
    # Python values and CPU rows for the whole batch at once, not one tensor index per image and field.
    probs = result.probs.cpu().unbind(0)
    n_views, disagree = result.n_views.tolist(), result.disagree.tolist()
    scores = None if result.ood_score is None else result.ood_score.tolist()
    flags = None if result.ood is None else result.ood.tolist()
    for row, idx in enumerate(owners):
        ood = {}
        if scores is not None:
            ood = dict(ood_score=scores[row], ood=flags[row])
            if slots[idx].explain:  # the parts are shown by /explanations only
                ood["ood_parts"] = {name: float(part[row]) for name, part in result.ood_parts.items()}
        out[idx].append(ImageResult(probs[row], n_views[row], disagree[row], result.view_probs[row].cpu(), **ood))
    return out
