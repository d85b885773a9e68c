"""The Open Inference Protocol (KServe v2) for one request of a batch.

TorchServe's own v2 envelope (``service_envelope=kservev2``) reads only the first request
of a batch (pytorch/serve#2158), so v2 is parsed here, per request, like every other
shape: batching keeps working and a bad v2 request is answered alone. The gateway maps
``POST /v2/models/<m>[/versions/<v>]/infer`` to ``/predictions/<m>[/<v>]`` and
``GET /v2/models/<m>[/versions/<v>]`` to a describe request, with the header
``X-Inference-Protocol: v2``.

Request::

    {"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                              "data": ["<base64 image>", "<base64 image>"]}],
     "parameters": {"top_k": 3, "tta": true, "explain_class": "Coat"},
     "outputs": [{"name": "label"}, {"name": "probabilities"}]}      # optional filter

Answer: ``{"model_name", "model_version", "id", "outputs": [...]}`` with one named output
per field of the usual answer (OUTPUTS); an error: ``{"error": "<what to do>"}`` with a 4xx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from handler.errors import InvalidJSON, RequestError
from handler.request import Options, ParsedRequest, decode_base64, json_options

HEADER = "x-inference-protocol"
INPUT = "image"
# name -> (datatype, per-image value from (answer, probabilities)); probabilities are [n, classes].
OUTPUTS = {
    "label": "BYTES",
    "class_index": "INT64",
    "confidence": "FP32",
    "probabilities": "FP32",
    "uncertain": "BOOL",
    "out_of_distribution": "BOOL",
    "ood_score": "FP32",
}
_HINT = ('Send {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": ["<base64 image>", ...]}], '
         '"parameters": {"top_k": 3, "tta": true}}.')


class InvalidV2Request(InvalidJSON):
    reason = "invalid_v2"


def requested(headers: Mapping[str, str]) -> bool:
    return headers.get(HEADER, "").strip().lower() == "v2"


def _payload(item: Mapping[str, Any]) -> Any:
    payload = next((item[k] for k in ("body", "data") if item.get(k) is not None), None)
    if isinstance(payload, (bytes, bytearray, str)):
        try:
            payload = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise InvalidV2Request(f"The v2 request body is not valid JSON ({exc}). {_HINT}") from None
    if not isinstance(payload, dict):
        raise InvalidV2Request(f"The v2 request body must be a JSON object; got {type(payload).__name__}. {_HINT}")
    return payload


def parse(item: Mapping[str, Any], base: Options, classes: tuple[str, ...], max_instances: int) -> tuple[ParsedRequest, dict]:
    """(the images and their options, {"id", "outputs"}) of one v2 inference request."""
    doc = _payload(item)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidV2Request(f'"inputs" must be a non-empty list. {_HINT}')
    named = [i for i in inputs if isinstance(i, dict) and i.get("name") == INPUT]
    if len(named) != 1 and not (len(inputs) == 1 and isinstance(inputs[0], dict)):
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise InvalidV2Request(f'Expected one input named "{INPUT}"; got {names}. {_HINT}')
    tensor = named[0] if named else inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise InvalidV2Request(f'Input "{INPUT}" must have datatype "BYTES" (base64-encoded image files); '
                               f'got {tensor.get("datatype")!r}.')
    data = tensor.get("data")
    while isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]
    if isinstance(data, list) and data and all(isinstance(d, list) for d in data):
        data = [x for row in data for x in row]
    if not isinstance(data, list) or not data:
        raise InvalidV2Request(f'Input "{INPUT}" needs "data": a non-empty list of base64 strings. {_HINT}')
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and math.prod(shape) == len(data)):
        raise InvalidV2Request(f'Input "{INPUT}": "shape" must list non-negative integers whose product is the '
                               f"number of items in \"data\" ({len(data)}); got {shape!r}.")
    if len(data) > max_instances:
        raise InvalidV2Request(f'Input "{INPUT}" holds {len(data)} images; the limit is {max_instances}. Split the request.')
    params = doc.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InvalidV2Request('"parameters" must be an object, e.g. {"top_k": 3, "tta": true}.')
    options = base.merged(json_options(params, classes, "parameters."))
    images = [decode_base64(d, f"inputs[{INPUT}].data[{i}]: ") for i, d in enumerate(data)]
    outputs = doc.get("outputs")
    wanted = list(OUTPUTS)
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise InvalidV2Request('"outputs" must be a list of {"name": ...} objects.')
        wanted = [o["name"] for o in outputs]
        unknown = [n for n in wanted if n not in OUTPUTS]
        if unknown:
            raise InvalidV2Request(f"Unknown outputs {unknown}; valid: {', '.join(OUTPUTS)}.")
    request_id = doc.get("id")
    return (ParsedRequest(images, [options] * len(images), is_list=True, from_json=True),
            {"id": request_id if isinstance(request_id, str) else None, "outputs": wanted})


def response(answers: list[dict], probs: list[list[float]], meta: dict, model: str, version: str | None) -> dict:
    """The v2 answer for one request: one named output per field, one row per image."""
    n = len(answers)
    columns = {
        "label": [a["label"] for a in answers],
        "class_index": [a["class_index"] for a in answers],
        "confidence": [a["confidence"] for a in answers],
        "probabilities": [round(p, 6) for row in probs for p in row],
        "uncertain": [a["uncertain"] for a in answers],
        "out_of_distribution": [a["out_of_distribution"] for a in answers],
        "ood_score": [a["ood_score"] for a in answers],
    }
    outputs = []
    for name in meta["outputs"]:
        shape = [n, len(probs[0])] if name == "probabilities" else [n]
        outputs.append({"name": name, "datatype": OUTPUTS[name], "shape": shape, "data": columns[name]})
    body = {"model_name": model, "model_version": version, "outputs": outputs}
    if meta.get("id") is not None:
        body["id"] = meta["id"]
    return body


def error(exc: RequestError) -> dict:
    return {"error": exc.message}


def metadata(model: str, version: str | None, classes: tuple[str, ...], max_instances: int) -> dict:
    """GET /v2/models/<m>: what the model takes and gives."""
    return {
        "name": model,
        "versions": [version] if version else [],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1],
                    "parameters": {"content": "base64-encoded image file (PNG, JPEG, ...)", "max_items": max_instances}}],
        "outputs": [{"name": name, "datatype": dtype, "shape": [-1, len(classes)] if name == "probabilities" else [-1]}
                    for name, dtype in OUTPUTS.items()],
        "parameters": {"classes": list(classes), "request_parameters": ["top_k", "tta", "explain_class"]},
    }
