"""Merged probabilities -> the JSON answer a client receives."""

from __future__ import annotations

import dataclasses
import json

import torch

from handler import v2
from handler.errors import RequestError
from handler.preprocess import DESCRIBE, V2_METADATA
from handler.spec import ModelSpec


def answer(probs: torch.Tensor, spec: ModelSpec, top_k: int, n_views: int,
           ood_score: float | None = None, ood: bool = False) -> dict:
    """One image's answer.

    ``confidence`` is the merged (temperature-scaled) probability of the top class;
    ``uncertain`` is true when it is below ``spec.threshold`` or when the image is out of
    distribution (``ood_score`` above ``spec.ood.threshold``): a label is still given.
    """
    values, indices = torch.topk(probs, k=top_k)
    ranked = [
        {"label": spec.class_names[i], "class_index": i, "probability": round(float(p), 6)}
        for p, i in zip(values.tolist(), indices.tolist())
    ]
    best = ranked[0]
    confidence = float(values[0])
    return {
        "label": best["label"],
        "class_index": best["class_index"],
        "confidence": round(confidence, 6),
        "uncertain": bool(confidence < spec.threshold or ood),
        "out_of_distribution": bool(ood),
        "ood_score": None if ood_score is None else round(float(ood_score), 4),
        "top_k": ranked,
        "tta_views": int(n_views),
    }


def explanation(view_probs: torch.Tensor, view_names: tuple[str, ...], spec: ModelSpec) -> list[dict]:
    """Per-view breakdown for /explanations: what each TTA view predicted on its own."""
    out = []
    for name, probs in zip(view_names, view_probs):
        p, i = torch.max(probs, dim=-1)
        out.append({"view": name, "label": spec.class_names[int(i)], "class_index": int(i), "probability": round(float(p), 6)})
    return out


def describe(spec: ModelSpec, version: str | None) -> dict:
    """The answer to a describe request: what this model expects and how it is served."""
    return {
        "model": spec.name,
        "version": version,
        "classes": list(spec.class_names),
        "input": {
            "size": list(spec.input_size),
            "channels": spec.channels,
            "resize": spec.resize,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "background": list(spec.background),
        },
        "tta": {"views": list(spec.tta), "merge": spec.merge,
                "gate": None if spec.tta_gate is None else dataclasses.asdict(spec.tta_gate)},
        "threshold": spec.threshold,
        "canonical": None if spec.canonical is None else dataclasses.asdict(spec.canonical),
        "ood": dataclasses.asdict(spec.ood),
        "top_k": spec.top_k,
        "limits": {"max_pixels": spec.limits.max_pixels, "max_frames": spec.limits.max_frames,
                   "max_instances": spec.limits.max_instances},
    }


def encode(body) -> tuple[str | bytes, str, dict[str, str]]:
    """(payload, Content-Type, extra response headers) of a body ``render`` gave."""
    if isinstance(body, v2.Binary):  # the binary tensor data extension: a JSON header, then the outputs' bytes
        return body.body, "application/octet-stream", {"Inference-Header-Content-Length": str(body.header_length)}
    return json.dumps(body), "application/json", {}


def render(slot, result, spec: ModelSpec, view_names: tuple[str, ...], version: str | None,
           model_name: str | None = None):
    """(status, phrase, body, answers) for one request of the batch.

    ``slot`` is the preprocess stage's output for the request and ``result`` the
    inference stage's (a list of ImageResult when the request was prepared).
    ``answers`` are the per-image answers in the usual shape whatever the protocol
    (for the quality metrics); empty for errors and descriptions.
    """
    model = model_name or spec.name
    if isinstance(slot, RequestError):
        return slot.status, slot.phrase, v2.error(slot) if getattr(slot, "v2", False) else slot.to_body(), []
    if slot == DESCRIBE:
        return 200, "OK", describe(spec, version), []
    if slot == V2_METADATA:
        return 200, "OK", v2.metadata(model, version, spec.class_names, spec.limits.max_instances), []
    answers = []
    for image, options in zip(result, slot.options):
        body = answer(image.probs, spec, options.top_k or spec.top_k, image.n_views, image.ood_score, image.ood)
        if slot.explain:
            body["views"] = explanation(image.view_probs, view_names[: image.n_views], spec)
            if image.ood_parts is not None:
                body["ood"] = {"method": spec.ood.method, "threshold": spec.ood.threshold,
                               "parts": {name: round(value, 4) for name, value in image.ood_parts.items()}}
            if image.explanation is not None:
                body["explanation"] = image.explanation
        answers.append(body)
    if slot.v2 is not None:
        body = v2.response(answers, [image.probs.tolist() for image in result], slot.v2, model, version)
        return 200, "OK", body, answers
    return 200, "OK", answers if slot.is_list else answers[0], answers
