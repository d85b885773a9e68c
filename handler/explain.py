"""Where the model looked: a heatmap per image for /explanations, without hooks.

A model that offers ``forward_features(x) -> (logits, embedding, feature_map)`` and
``head(feature_map) -> logits`` (scripts/train/model.py) is explained with Grad-CAM on
that feature map times the gradient at the input: the gradient of the class logit with
respect to the feature map comes from ``torch.autograd.grad`` through ``head`` alone,
so scripted modules (which support no hooks) work, and only the requests that asked
pay for it. Any other classifier falls back to input x gradient; integrated gradients
and plain saliency are here too (no extra dependency), for the comparison.

Which method and layer serve was chosen by measurement, not assumed:
``scripts/evaluate/explain.py`` compares the candidates on held-out images by the
heatmap's mass on the garment and by the model-randomisation sanity check
(docs/explanations.md). Every map is non-negative, upsampled to the model's input
resolution and scaled to [0, 1] per image (brighter = more important); a map with no
positive evidence stays all zero rather than being stretched from noise.

The model explained must be the unfrozen one: a frozen model's ``head`` is inlined
away and its constants carry no gradient.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handler.errors import InternalError
from handler.inference import ImageResult
from handler.loader import has_method
from handler.preprocess import Prepared

logger = logging.getLogger(__name__)

CAM_METHODS = ("grad-cam-x-gradient", "grad-cam", "layer-cam")  # need forward_features + head
INPUT_METHODS = ("input-x-gradient", "integrated-gradients", "saliency")  # any differentiable classifier
METHODS = CAM_METHODS + INPUT_METHODS
# What serves, chosen in docs/explanations.md: Grad-CAM on the 7x7 feature map times the input gradient
# (guided Grad-CAM's product, with a plain gradient: guided backpropagation needs hooks). Plain Grad-CAM
# on that map puts no more mass on the garment than chance; LayerCAM and integrated gradients fail the
# randomisation check. Models without forward_features/head get input x gradient, the best input method
# that passes it.
DEFAULT_CAM = "grad-cam-x-gradient"
FALLBACK = "input-x-gradient"
IG_STEPS = 16


def supports_cam(model) -> bool:
    return has_method(model, "forward_features") and has_method(model, "head")


def _class_score(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return logits.float().gather(1, classes.view(-1, 1)).sum()


def cam_from(feature_map: torch.Tensor, grad: torch.Tensor, variant: str) -> torch.Tensor:
    """(M, C, h, w) activations and gradients -> (M, h, w) non-negative map.

    Grad-CAM (Selvaraju et al. 2017) weights each channel by its spatially averaged
    gradient; LayerCAM (Jiang et al. 2021) weights each location by its own positive
    gradient, which keeps fine, location-specific evidence that averaging cancels.
    """
    if variant == "grad-cam":
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * feature_map).sum(dim=1))
    if variant == "layer-cam":
        return torch.relu((torch.relu(grad) * feature_map).sum(dim=1))
    raise ValueError(f"unknown CAM variant {variant!r}; valid: {', '.join(CAM_METHODS)}")


def feature_cam(model, x: torch.Tensor, classes: torch.Tensor, variant: str = "grad-cam") -> torch.Tensor:
    """Class activation maps on the model's ``forward_features`` feature map, (M, h, w), not yet upsampled."""
    with torch.inference_mode(False), torch.no_grad():
        feature_map = model.forward_features(x.clone())[2]
    with torch.inference_mode(False), torch.enable_grad():
        feature_map = feature_map.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_class_score(model.head(feature_map), classes), feature_map)
    return cam_from(feature_map.detach(), grad, variant)


def input_attribution(model, x: torch.Tensor, classes: torch.Tensor, method: str, baseline: torch.Tensor,
                      steps: int = IG_STEPS) -> torch.Tensor:
    """Attribution on the input, (M, H, W): absolute value summed over channels.

    - ``integrated-gradients`` (Sundararajan et al. 2017): (x - baseline) times the mean gradient
      along the straight path from ``baseline`` (the spec's background canvas) to x, midpoint rule;
    - ``input-x-gradient``: x times the gradient at x;
    - ``saliency``: the absolute gradient at x.
    """
    x = x.detach().clone()
    with torch.inference_mode(False), torch.enable_grad():
        if method == "integrated-gradients":
            alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
            delta = x - baseline
            path = (baseline + alphas.view(-1, 1, 1, 1, 1) * delta.unsqueeze(0)).flatten(0, 1)  # (steps*M, C, H, W)
            path.requires_grad_(True)
            (grad,) = torch.autograd.grad(_class_score(model(path), classes.repeat(steps)), path)
            attribution = delta * grad.view(steps, *x.shape).mean(dim=0)
        elif method in ("input-x-gradient", "saliency"):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(_class_score(model(x), classes), x)
            attribution = grad * x.detach() if method == "input-x-gradient" else grad
        else:
            raise ValueError(f"unknown input attribution {method!r}; valid: {', '.join(INPUT_METHODS)}")
    return attribution.abs().sum(dim=1)


def to_input_size(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(M, h, w) -> (M, H, W), each scaled to [0, 1] by its maximum (an all-zero map stays zero)."""
    maps = maps.detach().float().unsqueeze(1)
    if tuple(maps.shape[-2:]) != tuple(size):
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        maps = F.interpolate(maps, size=tuple(size), mode=mode, **kwargs).clamp_min(0)
    maps = maps.squeeze(1)
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))


def heatmaps(model, x: torch.Tensor, classes: torch.Tensor, method: str, baseline: torch.Tensor) -> torch.Tensor:
    """(M, H, W) heatmaps in [0, 1] at the input resolution for the images ``x`` and their ``classes``."""
    size = tuple(x.shape[-2:])
    if method == "grad-cam-x-gradient":
        cam = to_input_size(feature_cam(model, x, classes, "grad-cam"), size)
        maps = cam * input_attribution(model, x, classes, "saliency", baseline)
    elif method in CAM_METHODS:
        maps = feature_cam(model, x, classes, method)
    else:
        maps = input_attribution(model, x, classes, method, baseline)
    return to_input_size(maps, size)


# --- images -------------------------------------------------------------------------------------------

# A perceptual dark-to-bright ramp (inferno's anchors) for the overlay.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colourise(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 on the inferno ramp."""
    pos = np.clip(heat, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)


def input_image(x: torch.Tensor, mean, std) -> np.ndarray:
    """One normalised input (C, H, W) -> the uint8 image the model saw: (H, W) grey or (H, W, 3) RGB."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = ((x.detach().float().cpu() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    arr = pixels.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The heatmap in colour over the (dimmed, grey) image, weighted by the heat itself."""
    grey = image if image.ndim == 2 else image.astype(np.float32).mean(axis=-1)
    base = np.repeat(grey.astype(np.float32)[..., None], 3, axis=-1) * 0.8
    weight = (alpha * np.clip(heat, 0, 1))[..., None]
    return (base * (1 - weight) + colourise(heat).astype(np.float32) * weight).round().clip(0, 255).astype(np.uint8)


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Explainer:
    """How a model is explained, resolved once at load: the unfrozen model, the method and the background."""

    model: torch.nn.Module | torch.jit.ScriptModule
    method: str
    baseline: torch.Tensor  # (1, C, 1, 1): the spec's background in normalised units (integrated gradients' start)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def build(cls, model, spec, baseline: torch.Tensor, method: str | None = None) -> Explainer:
        method = method or (DEFAULT_CAM if supports_cam(model) else FALLBACK)
        if method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}; valid: {', '.join(METHODS)}")
        if method in CAM_METHODS and not supports_cam(model):
            raise ValueError(f"{method} needs a model with forward_features and head methods")
        return cls(model, method, baseline, tuple(spec.mean), tuple(spec.std))

    def heatmaps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return heatmaps(self.model, x, classes.to(x.device), self.method, self.baseline.to(x.device))

    def explain(self, x: torch.Tensor, classes: list[int], class_names) -> list[dict]:
        """The "explanation" object of each image: ``x`` (M, C, H, W) normalised inputs, one class each."""
        heat = self.heatmaps(x, torch.tensor(classes, dtype=torch.long)).cpu().numpy()
        out = []
        for tensor, cls, h in zip(x, classes, heat):
            image = input_image(tensor, self.mean, self.std)
            out.append({
                "method": self.method,
                "class_index": int(cls),
                "label": class_names[int(cls)],
                "heatmap_png": png_base64((h * 255.0).round().astype(np.uint8)),
                "overlay_png": png_base64(overlay(image, h)),
                "input_png": png_base64(image),
            })
        return out


def attach(explainer: Explainer, slots: list, results: list, class_names, device: torch.device | None = None,
           request_id=str) -> tuple[list, list]:
    """Add an explanation to every image of the requests that asked (/explanations), in one batched pass.

    Predictions are untouched: they were computed before, on the frozen model, for the whole batch.
    Each image is explained for its request's ``explain_class`` or else its predicted (merged) class,
    on the identity view: the canonical input the model saw. A failure here answers the requests that
    asked with a 500 of their own; the others keep their answers. Returns (slots, results).
    """
    rows = [(idx, j) for idx, slot in enumerate(slots) if isinstance(slot, Prepared) and slot.explain
            for j in range(len(slot.tensors))]
    if not rows:
        return slots, results
    x = torch.stack([slots[idx].tensors[j] for idx, j in rows])
    if device is not None:
        x = x.to(device)
    classes = []
    for idx, j in rows:
        chosen = slots[idx].options[j].explain_class
        classes.append(int(results[idx][j].probs.argmax()) if chosen is None else chosen)
    slots, results = list(slots), [list(r) if isinstance(r, list) else r for r in results]
    try:
        explanations = explainer.explain(x, classes, class_names)
    except Exception:  # a bug, not a client error: only the requests that asked for explanations fail
        for idx in sorted({idx for idx, _ in rows}):
            logger.exception("Explaining request %s failed", request_id(idx))
            slots[idx] = InternalError(f"The server failed to explain this request (id {request_id(idx)}); it has "
                                       "been logged. /predictions answers it; other requests are unaffected.")
        return slots, results
    for (idx, j), explanation in zip(rows, explanations):
        image: ImageResult = results[idx][j]
        region = slots[idx].regions[j] if j < len(slots[idx].regions) else None
        # Where the object was found in the upload (shares of the upright image): what canonicalisation cropped.
        explanation["region"] = None if region is None else dict(zip(("left", "top", "right", "bottom"),
                                                                    (round(v, 4) for v in region)))
        results[idx][j] = dataclasses.replace(image, explanation=explanation)
    return slots, results
