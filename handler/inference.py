"""Batched TTA inference: every view of every image in ONE forward pass.

The batch is laid out view-major: the identity view of all N images first (a
request with TTA off needs nothing else), then each extra view of the M images
that asked for TTA.  One ``model(stacked)`` call under ``torch.inference_mode()``
produces all logits; they are split back per view and merged per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handler.errors import SpecError
from handler.preprocess import Prepared
from handler.spec import ModelSpec
from handler.tta import View, background_fill, expand, merge, parse_view


@dataclass(frozen=True)
class Policy:
    """The TTA views and merge rule, resolved once from the spec."""

    names: tuple[str, ...]
    views: tuple[View, ...]
    fill: torch.Tensor
    merge: str
    temperature: float

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Policy:
        return cls(
            names=spec.tta,
            views=tuple(parse_view(name) for name in spec.tta),
            fill=background_fill(spec),
            merge=spec.merge,
            temperature=float(spec.temperature),
        )


@dataclass(frozen=True)
class BatchResult:
    probs: torch.Tensor  # (N, K) merged probabilities
    n_views: torch.Tensor  # (N,) views merged per image (1 where TTA was off)
    disagree: torch.Tensor  # (N,) bool: the views' top-1 classes differ
    view_probs: list[torch.Tensor]  # per image: (n_views, K) probabilities of each view


def classify(model: torch.jit.ScriptModule | torch.nn.Module, x: torch.Tensor, use_tta: torch.Tensor, policy: Policy) -> BatchResult:
    """Classify a batch ``x`` (N, C, H, W); ``use_tta`` (N,) bool selects the images that get all views."""
    n = x.shape[0]
    on = torch.nonzero(use_tta, as_tuple=False).flatten()
    extra = policy.views[1:] if len(on) else ()
    stacked = torch.cat([x, expand(x[on], list(extra), policy.fill)]) if extra else x
    with torch.inference_mode():
        logits = model(stacked).float()
    k = logits.shape[-1]
    base = logits[:n]
    probs = torch.softmax(base / policy.temperature, dim=-1)
    n_views = torch.ones(n, dtype=torch.long)
    disagree = torch.zeros(n, dtype=torch.bool)
    view_probs = [p.unsqueeze(0) for p in probs]
    if extra:
        per_view = torch.cat([base[on].unsqueeze(0), logits[n:].view(len(extra), len(on), k)])  # (V, M, K)
        probs[on] = merge(per_view, policy.merge, policy.temperature)
        top1 = per_view.argmax(dim=-1)  # (V, M)
        disagree[on] = (top1 != top1[0:1]).any(dim=0)
        n_views[on] = per_view.shape[0]
        each = torch.softmax(per_view / policy.temperature, dim=-1)
        for j, i in enumerate(on.tolist()):
            view_probs[i] = each[:, j]
    return BatchResult(probs, n_views, disagree, view_probs)


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


def infer(model, slots: list, policy: Policy, device: torch.device | None = None) -> list:
    """Run every image of every prepared request in the batch through ``classify`` at once.

    ``slots`` is the preprocess stage's output; prepared requests are replaced by
    their list of ``ImageResult``, anything else (errors, describe) passes through.
    """
    owners, tensors, tta = [], [], []
    for idx, slot in enumerate(slots):
        if isinstance(slot, Prepared):
            for tensor, options in zip(slot.tensors, slot.options):
                owners.append(idx)
                tensors.append(tensor)
                tta.append(options.tta is not False)
    if not tensors:
        return list(slots)
    x = torch.stack(tensors)
    use_tta = torch.tensor(tta, dtype=torch.bool)
    if device is not None and device.type != "cpu":
        x = x.to(device)
        policy = Policy(policy.names, policy.views, policy.fill.to(device), policy.merge, policy.temperature)
    result = classify(model, x, use_tta.to(x.device), policy)
    out = [slot if not isinstance(slot, Prepared) else [] for slot in slots]
    for row, idx in enumerate(owners):
        out[idx].append(
            ImageResult(
                result.probs[row].cpu(), int(result.n_views[row]), bool(result.disagree[row]), result.view_probs[row].cpu()
            )
        )
    return out
