"""Readiness gated on known answers: golden inputs run through the full path at load.

The exporter stores a few inputs (a native image, a catalogue-style photo, a
non-garment) with the answers it saw in ``golden.json``.  Every worker runs them
through the same stages as a request (bytes -> prepare -> infer -> render, TTA off
so a serving override of the views does not matter) in ``initialize()`` and refuses
to start, naming what differed, when a label, the out-of-distribution flag or a
probability differs by more than ``TOLERANCE`` or the out-of-distribution score by
more than ``SCORE_TOLERANCE``.  Preprocessing drift from a library
upgrade, or a tampered archive, is caught before any user sees it.
"""

from __future__ import annotations

import base64
import logging

from handler.errors import SpecError
from handler.inference import infer
from handler.postprocess import render
from handler.preprocess import Prepared, prepare

logger = logging.getLogger(__name__)

TOLERANCE = 2e-3  # probabilities: frozen vs exported model, CPU vs CPU: ~1e-6; preprocessing drift: far more
# The out-of-distribution score is not squashed by a softmax, so it moves even when a confident
# answer's probabilities do not (a resampling filter changed, say); frozen vs exported: ~1e-4.
SCORE_TOLERANCE = 0.02


def answer_bytes(data: bytes, model, spec, policy, device=None) -> dict:
    """The JSON answer the server gives for ``data`` with TTA off and every class listed."""
    slot = prepare({"body": data}, {"x-tta": "off", "x-top-k": str(spec.num_classes)}, spec)
    if not isinstance(slot, Prepared):
        raise SpecError(f"a golden input is refused by the preprocessing: {getattr(slot, 'message', slot)}")
    status, _, body, _ = render(slot, infer(model, [slot], policy, device)[0], spec, policy.names, None)
    return body


def expected(body: dict) -> dict:
    """What a golden entry stores of an answer."""
    return {
        "label": body["label"],
        "out_of_distribution": body["out_of_distribution"],
        "ood_score": body["ood_score"],
        "probabilities": {item["label"]: item["probability"] for item in body["top_k"]},
    }


def verify(golden: list[dict], model, spec, policy, device=None) -> list[str]:
    """Differences between the stored answers and this worker's; empty when all agree."""
    problems = []
    for entry in golden:
        got = expected(answer_bytes(base64.b64decode(entry["image"]), model, spec, policy, device))
        want = entry["expected"]
        name = entry.get("name", "?")
        if got["label"] != want["label"]:
            problems.append(f"{name}: label {got['label']!r}, expected {want['label']!r}")
        if got["out_of_distribution"] != want["out_of_distribution"]:
            problems.append(f"{name}: out_of_distribution {got['out_of_distribution']}, "
                            f"expected {want['out_of_distribution']}")
        worst = max(abs(got["probabilities"].get(k, 0.0) - v) for k, v in want["probabilities"].items())
        if worst > TOLERANCE:
            problems.append(f"{name}: a probability differs by {worst:.4f} (tolerance {TOLERANCE})")
        if want.get("ood_score") is not None and abs(got["ood_score"] - want["ood_score"]) > SCORE_TOLERANCE:
            problems.append(f"{name}: ood_score {got['ood_score']}, expected {want['ood_score']} "
                            f"(tolerance {SCORE_TOLERANCE})")
    return problems


def require(golden: list[dict], model, spec, policy, device=None) -> None:
    """Raise (the worker refuses to start) unless every golden input is answered as at export."""
    problems = verify(golden, model, spec, policy, device)
    if problems:
        raise RuntimeError("golden inputs answered differently than at export, refusing to serve: " + "; ".join(problems))
    logger.info("Golden inputs: %d answered as at export", len(golden))
