"""What a TorchScript classifier offers the out-of-distribution detector, made into ``forward_features``.

The handler's features detector (``handler.ood``) reads ``forward_features(x) -> (logits, embedding,
feature_map)``.  A user's model is served through that method in one of three ways, in this order:

1. **its own** ``forward_features`` (as ``scripts/train/model.py`` writes it): the whole embedding is one layer;
2. **its submodules run in order**: the scripted model's children (a ``ModuleList``'s items in turn, a
   flatten where a ``Linear`` follows a feature map) reproduce its ``forward`` (checked on the user's own
   images and on noise, max |diff| < 1e-5 relative); every block's output is tapped (feature maps averaged
   over space) and each tap is a layer of the detector.  TorchScript keeps a model's submodules, so this
   works for ``nn.Sequential`` models, torchvision's ResNets and the like, without their source;
3. **its logits** only, where neither holds (a model whose ``forward`` does more than chain its children).

The model that is saved is a small wrapper (``Featured``): ``forward`` is the user's model itself, unchanged;
``forward_features`` runs the chain (2) or returns the logits as the embedding (3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from handler.loader import has_method

PARITY_TOLERANCE = 1e-5  # relative to the largest logit: the chain must give the model's own answers


class FeaturesError(RuntimeError):
    """The model's features cannot be read as promised."""


class Featured(nn.Module):
    """The user's model, plus ``forward_features`` from its submodules run in order (or from its logits)."""

    def __init__(self, model, chain: list, flatten_before: list[bool], taps: list[bool]):
        super().__init__()
        self.model = model
        self.chain = nn.ModuleList(chain)
        self.flatten_before = flatten_before
        self.taps = taps
        self.use_chain = len(chain) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.use_chain:
            logits = self.model(x)
            return logits, logits, x
        pooled: list[torch.Tensor] = []
        feature_map = x
        i = 0
        for stage in self.chain:
            if self.flatten_before[i] and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = stage(x)
            if self.taps[i]:
                if x.dim() == 4:
                    pooled.append(x.mean(dim=(2, 3)))
                    feature_map = x
                else:
                    pooled.append(x.flatten(1))
            i += 1
        return x, torch.cat(pooled, dim=1), feature_map


@dataclass
class Features:
    """How a model's features are read, and the layers of its embedding."""

    source: str  # "forward_features", "submodules" or "logits"
    model: torch.jit.ScriptModule  # what is saved and served: the user's model, or Featured around it
    layers: list[tuple[str, int, int]] = field(default_factory=list)  # (name, start, stop) in the embedding
    about: str = ""

    def to_json(self) -> dict:
        return {"source": self.source, "layers": [{"name": n, "dims": b - a} for n, a, b in self.layers],
                "about": self.about}


def _kind(module) -> str:
    return getattr(module, "original_name", type(module).__name__)


def chain_of(model) -> list[tuple[str, object]]:
    """The model's children in order, a ModuleList's items in its place (a ModuleList cannot be called)."""
    out = []
    for name, child in model.named_children():
        if _kind(child) == "ModuleList":
            out += [(f"{name}.{i}", item) for i, item in enumerate(child.children())]
        else:
            out.append((name, child))
    return out


def _run_chain(chain, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[bool]]:
    outputs, flattens = [], []
    for _, module in chain:
        flatten = _kind(module) == "Linear" and x.dim() > 2
        if flatten:
            x = torch.flatten(x, 1)
        x = module(x)
        if not isinstance(x, torch.Tensor):
            raise FeaturesError(f"{_kind(module)} returns {type(x).__name__}, not a tensor")
        outputs.append(x)
        flattens.append(flatten)
    return x, outputs, flattens


def choose_taps(chain, outputs: list[torch.Tensor], max_dims: int = 1024) -> list[bool]:
    """Tap the last output of every run of equal shapes (a block's end: conv -> bn -> relu taps the relu),
    skip reshapes (flatten: the same values as the feature map before it), 1x1 maps that only pool the
    previous map, the final logits, and wide flat vectors."""
    taps = [False] * len(outputs)
    shapes = [tuple(o.shape[1:]) for o in outputs]
    for i, out in enumerate(outputs[:-1]):
        if shapes[i] == shapes[i + 1]:
            continue  # the run goes on: tap its last
        previous = outputs[i - 1] if i else None
        if previous is not None and out.numel() == previous.numel() and out.dim() < previous.dim():
            continue  # a flatten
        if _kind(chain[i][1]).endswith("Pool2d"):
            continue  # a pooling of the map before it: its block's end is tapped already
        dims = out.shape[1] if out.dim() == 4 else out[0].numel()
        if out.dim() not in (2, 4) or dims > max_dims:
            continue
        taps[i] = True
    return taps


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= PARITY_TOLERANCE * max(1.0, float(b.abs().max()))


def read_features(model, probes: list[torch.Tensor]) -> Features:
    """How to read ``model``'s features, checked on ``probes`` (batches of model inputs: the user's images, noise)."""
    with torch.inference_mode():
        expected = [model(x) for x in probes]
    if has_method(model, "forward_features"):
        with torch.inference_mode():
            got = [model.forward_features(x) for x in probes]
        if not all(isinstance(g, tuple) and len(g) == 3 for g in got):
            raise FeaturesError("the model's forward_features must return (logits, embedding, feature_map)")
        if not all(_close(g[0], e) for g, e in zip(got, expected)):
            raise FeaturesError("the model's forward_features gives other logits than its forward")
        dims = got[0][1].shape[1]
        return Features("forward_features", model, [("embedding", 0, dims)],
                        f"the model's own forward_features: one {dims}-dimensional embedding")
    chain = chain_of(model)
    why = ""
    try:
        with torch.inference_mode():
            runs = [_run_chain(chain, x) for x in probes] if chain else []
        if not runs:
            why = "it has no submodules"
        elif not all(_close(run[0], e) for run, e in zip(runs, expected)):
            why = "its submodules run in order do not reproduce its forward (it does more than chain them)"
    except Exception as exc:  # noqa: BLE001 - any failure means "the chain is not the model"
        why = f"its submodules cannot be run in order ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if not why:
        outputs, flattens = runs[0][1], runs[0][2]
        taps = choose_taps(chain, outputs)
        if not any(taps):
            why = "no submodule output could serve as a layer"
    if why:
        wrapper = torch.jit.script(Featured(model, [], [], []))
        k = expected[0].shape[1]
        return Features("logits", wrapper, [("logits", 0, k)], f"the logits only: {why}")
    wrapper = torch.jit.script(Featured(model, [m for _, m in chain], flattens, taps))
    wrapper.eval()
    layers, start = [], 0
    for (name, _), out, tapped in zip(chain, outputs, taps):
        if tapped:
            dims = out.shape[1] if out.dim() == 4 else out[0].numel()
            layers.append((name.replace(".", "_"), start, start + dims))
            start += dims
    with torch.inference_mode():
        for x, e in zip(probes, expected):
            logits, embedding, _ = wrapper.forward_features(x)
            if not _close(logits, e) or embedding.shape[1] != start:
                raise FeaturesError("the scripted wrapper's forward_features differs from the chain it was built from")
    names = ", ".join(f"{n} ({b - a})" for n, a, b in layers)
    return Features("submodules", wrapper, layers,
                    f"the model's submodules run in order ({len(chain)} of them, checked against its forward); "
                    f"layers tapped: {names}")
