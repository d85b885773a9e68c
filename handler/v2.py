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

The binary tensor data extension (what ``tritonclient`` and ``kserve`` send by default): the
body is a JSON header of ``Inference-Header-Content-Length`` bytes, then the raw tensors of the
inputs whose ``parameters`` carry ``binary_data_size``, in input order. A BYTES tensor is its
elements, each a 4-byte little-endian length and that many bytes; an ``image`` element is then
the image file itself (in JSON ``data`` it stays a base64 string). Outputs are answered the same
way when asked (``parameters.binary_data_output`` for all, an output's ``parameters.binary_data``
for one): the answer is then :class:`Binary`, a JSON header followed by the outputs' bytes
(BYTES length-prefixed, INT64/FP32 little-endian, BOOL one byte each).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from handler.errors import InvalidJSON, RequestError, UnsupportedMediaType
from handler.request import Options, ParsedRequest, decode_base64, json_options

HEADER = "x-inference-protocol"
BINARY_HEADER = "inference-header-content-length"  # the binary tensor data extension: the JSON header's byte length
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
_BINARY_HINT = ("With the binary tensor data extension, send the JSON header, then the raw tensors; the header "
                "Inference-Header-Content-Length is the JSON header's length in bytes, and each binary input says its "
                'length in "parameters": {"binary_data_size": n}. A BYTES element is a 4-byte little-endian length, '
                "then that many bytes (an image element: the image file).")
_DIGITS = re.compile(r"\+?[0-9]{1,12}")
_FILE_STARTS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*", b"BM")


class InvalidV2Request(InvalidJSON):
    reason = "invalid_v2"


class CompressedV2Request(UnsupportedMediaType):
    reason = "invalid_v2"


@dataclass(frozen=True)
class Binary:
    """An answer in the binary tensor data extension: ``body`` starts with a JSON header of ``header_length`` bytes."""

    body: bytes
    header_length: int


def requested(headers: Mapping[str, str]) -> bool:
    return headers.get(HEADER, "").strip().lower() == "v2"


def _json_doc(data: bytes | bytearray | str, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidV2Request(f"The v2 {what} is not valid JSON ({exc}). {_HINT}") from None
    if not isinstance(doc, dict):
        raise InvalidV2Request(f"The v2 {what} must be a JSON object; got {type(doc).__name__}. {_HINT}")
    return doc


def _payload(item: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[dict, bytes | None]:
    """(the JSON document, the binary section after it or None when the request is plain JSON)."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise CompressedV2Request(f"The v2 request body is compressed (Content-Encoding: {encoding[:20]}); "
                                  "send it uncompressed (tritonclient: leave request_compression_algorithm unset).")
    payload = next((item[k] for k in ("body", "data") if item.get(k) is not None), None)
    declared = headers.get(BINARY_HEADER)
    if declared is None:
        if isinstance(payload, (bytes, bytearray, str)):
            try:
                return _json_doc(payload, "request body"), None
            except InvalidV2Request as exc:
                if "binary_data_size" in (payload if isinstance(payload, str) else payload.decode("utf-8", "replace")):
                    exc.message += (" It has binary data (binary_data_size) but no Inference-Header-Content-Length "
                                    "header: send the header with the JSON header's length.")
                raise
        if not isinstance(payload, dict):
            raise InvalidV2Request(f"The v2 request body must be a JSON object; got {type(payload).__name__}. {_HINT}")
        return payload, None
    if isinstance(payload, dict):  # sent as application/json straight to TorchServe, which parsed it: no binary part
        return payload, b""
    body = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload or b"")
    if not _DIGITS.fullmatch(declared.strip()) or not 0 < int(declared) <= len(body):
        raise InvalidV2Request(f"Inference-Header-Content-Length is {declared[:24]!r}, but it must be the length in bytes "
                               f"of the JSON header at the start of the body (the body has {len(body)} bytes). "
                               + _BINARY_HINT)
    length = int(declared)
    return _json_doc(body[:length], "request's JSON header (the first Inference-Header-Content-Length bytes)"), body[length:]


def _binary_sizes(inputs: list, binary: bytes | None) -> list[int | None]:
    """Each input's binary_data_size (None: its data is in the JSON), checked against the binary section."""
    sizes = []
    for i, tensor in enumerate(inputs):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise InvalidV2Request(f'inputs[{i}]: "binary_data_size" must be a non-negative integer; got {size!r:.40}.')
        if size is not None and binary is None:
            raise InvalidV2Request(f'inputs[{i}] has "binary_data_size" but the request has no '
                                   f"Inference-Header-Content-Length header. {_BINARY_HINT}")
        if size is not None and tensor.get("data") is not None:
            raise InvalidV2Request(f'inputs[{i}] has both "data" and "binary_data_size": send its data in one place.')
        sizes.append(size)
    if binary is not None and sum(s or 0 for s in sizes) != len(binary):
        raise InvalidV2Request(f"The body holds {len(binary)} bytes after the JSON header, but the inputs' "
                               f"binary_data_size add up to {sum(s or 0 for s in sizes)}. {_BINARY_HINT}")
    return sizes


def _binary_section(sizes: list[int | None], binary: bytes, index: int) -> bytes:
    start = sum(s or 0 for s in sizes[:index])
    return binary[start:start + sizes[index]]


def bytes_elements(data: bytes, count: int, where: str) -> list[bytes]:
    """The ``count`` elements of a serialized BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise InvalidV2Request(f"{where}: element {len(elements)} has {len(data) - offset} bytes where its 4-byte "
                                   f"length should be. {_BINARY_HINT}")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if size > len(data) - offset and data[offset - 4:offset].startswith(_FILE_STARTS):
            raise InvalidV2Request(f"{where}: element {len(elements)} starts like an image file, not with its length: "
                                   "put each element's length (4 bytes, little-endian) before it. " + _BINARY_HINT)
        if size > len(data) - offset:
            raise InvalidV2Request(f"{where}: element {len(elements)} says it is {size} bytes long, but only "
                                   f"{len(data) - offset} bytes remain. {_BINARY_HINT}")
        elements.append(data[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise InvalidV2Request(f'{where}: the binary data holds {len(elements)} elements, but "shape" says {count}. '
                               + _BINARY_HINT)
    return elements


def parse(item: Mapping[str, Any], base: Options, classes: tuple[str, ...], max_instances: int,
          headers: Mapping[str, str] | None = None) -> tuple[ParsedRequest, dict]:
    """(the images and their options, {"id", "outputs", "binary"}) of one v2 inference request."""
    doc, binary = _payload(item, headers or {})
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidV2Request(f'"inputs" must be a non-empty list. {_HINT}')
    named = [i for i in inputs if isinstance(i, dict) and i.get("name") == INPUT]
    if len(named) != 1 and not (len(inputs) == 1 and isinstance(inputs[0], dict)):
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise InvalidV2Request(f'Expected one input named "{INPUT}"; got {names}. {_HINT}')
    sizes = _binary_sizes(inputs, binary)
    tensor = named[0] if named else inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise InvalidV2Request(f'Input "{INPUT}" must have datatype "BYTES" (image files: base64 strings in JSON, '
                               f'the raw files in binary data); got {tensor.get("datatype")!r:.40}.')
    size = sizes[inputs.index(tensor)]
    if size is not None:
        return _parse_binary(doc, tensor, _binary_section(sizes, binary, inputs.index(tensor)), base, classes,
                             max_instances)
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
    options, meta = _options_and_outputs(doc, base, classes)
    images = [decode_base64(d, f"inputs[{INPUT}].data[{i}]: ") for i, d in enumerate(data)]
    return ParsedRequest(images, [options] * len(images), is_list=True, from_json=True), meta


def _shape_count(tensor: Mapping[str, Any], max_instances: int) -> int:
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in shape)):
        raise InvalidV2Request(f'Input "{INPUT}": "shape" must be a list of non-negative integers (the number of '
                               f"images, e.g. [1]); got {shape!r:.40}.")
    count = math.prod(shape)
    if count == 0:
        raise InvalidV2Request(f'Input "{INPUT}" holds no image ("shape" {shape}). {_HINT}')
    if count > max_instances:
        raise InvalidV2Request(f'Input "{INPUT}" holds {count} images; the limit is {max_instances}. Split the request.')
    return count


def _parse_binary(doc: dict, tensor: Mapping[str, Any], data: bytes, base: Options, classes: tuple[str, ...],
                  max_instances: int) -> tuple[ParsedRequest, dict]:
    count = _shape_count(tensor, max_instances)
    options, meta = _options_and_outputs(doc, base, classes)
    images = bytes_elements(data, count, f'Input "{INPUT}"')
    return ParsedRequest(images, [options] * len(images), is_list=True, from_json=False), meta


def _flag(params: Any, name: str, where: str) -> bool | None:
    value = params.get(name) if isinstance(params, dict) else None
    if value is not None and not isinstance(value, bool):
        raise InvalidV2Request(f'{where}"{name}" must be true or false; got {value!r:.40}.')
    return value


def _options_and_outputs(doc: dict, base: Options, classes: tuple[str, ...]) -> tuple[Options, dict]:
    params = doc.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InvalidV2Request('"parameters" must be an object, e.g. {"top_k": 3, "tta": true}.')
    options = base.merged(json_options(params, classes, "parameters."))
    all_binary = bool(_flag(params, "binary_data_output", "parameters."))
    outputs = doc.get("outputs")
    wanted, binary = list(OUTPUTS), set(OUTPUTS) if all_binary else set()
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise InvalidV2Request('"outputs" must be a list of {"name": ...} objects.')
        wanted = [o["name"] for o in outputs]
        unknown = [n for n in wanted if n not in OUTPUTS]
        if unknown:
            raise InvalidV2Request(f"Unknown outputs {unknown}; valid: {', '.join(OUTPUTS)}.")
        binary = set()
        for i, o in enumerate(outputs):
            own = _flag(o.get("parameters"), "binary_data", f"outputs[{i}].parameters.")
            if own if own is not None else all_binary:
                binary.add(o["name"])
    request_id = doc.get("id")
    return options, {"id": request_id if isinstance(request_id, str) else None, "outputs": wanted, "binary": binary}


_NUMPY = {"INT64": "<i8", "FP32": "<f4", "BOOL": "?"}


def encode_tensor(datatype: str, values: list) -> bytes:
    """Values as the binary tensor data extension carries them (BYTES: each a 4-byte little-endian length, then UTF-8)."""
    if datatype == "BYTES":
        parts = [str(v).encode("utf-8") for v in values]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.asarray([math.nan if v is None else v for v in values], dtype=_NUMPY[datatype]).tobytes()


def response(answers: list[dict], probs: list[list[float]], meta: dict, model: str, version: str | None) -> dict | Binary:
    """The v2 answer for one request: one named output per field, one row per image (:class:`Binary` when asked)."""
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
    outputs, raw = [], []
    for name in meta["outputs"]:
        shape = [n, len(probs[0])] if name == "probabilities" else [n]
        if name in meta.get("binary", ()):
            raw.append(encode_tensor(OUTPUTS[name], columns[name]))
            outputs.append({"name": name, "datatype": OUTPUTS[name], "shape": shape,
                            "parameters": {"binary_data_size": len(raw[-1])}})
        else:
            outputs.append({"name": name, "datatype": OUTPUTS[name], "shape": shape, "data": columns[name]})
    body = {"model_name": model, "model_version": version, "outputs": outputs}
    if meta.get("id") is not None:
        body["id"] = meta["id"]
    if not raw:
        return body
    header = json.dumps(body).encode("utf-8")
    return Binary(header + b"".join(raw), len(header))


def error(exc: RequestError) -> dict:
    return {"error": exc.message}


def metadata(model: str, version: str | None, classes: tuple[str, ...], max_instances: int) -> dict:
    """GET /v2/models/<m>: what the model takes and gives."""
    return {
        "name": model,
        "versions": [version] if version else [],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1],
                    "parameters": {"content": "image file (PNG, JPEG, ...): a base64 string in JSON data, the file "
                                              "itself in binary tensor data and gRPC", "max_items": max_instances}}],
        "outputs": [{"name": name, "datatype": dtype, "shape": [-1, len(classes)] if name == "probabilities" else [-1]}
                    for name, dtype in OUTPUTS.items()],
        "parameters": {"classes": list(classes), "request_parameters": ["top_k", "tta", "explain_class"]},
    }
