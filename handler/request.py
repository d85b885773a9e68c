"""One TorchServe request -> the image bytes it carries and its per-request options.

TorchServe hands the handler, per request, a dict of parameters: ``body`` for a
raw body, one key per multipart field, with ``bytes``/``bytearray`` values, or an
already-parsed ``dict``/``list`` when the Content-Type is exactly
``application/json``.  Query strings never arrive, so options come from headers
(``X-Top-K``, ``X-TTA``, ``X-Explain-Class``, any case), multipart fields (``top_k``,
``tta``, ``explain_class``) or JSON fields (``top_k``, ``tta``, ``explain_class``); a
field in the body wins over a header.

``tta`` is one of three modes: ``off`` (the identity view only), ``on`` (the spec's
policy: the extra views for the images its gate lets through, the default) and ``all``
(every view for every image, whatever the gate); ``true``/``false`` mean on/off.

Accepted shapes:

- raw image bytes, with any or no Content-Type
- multipart field ``data``, ``file`` or ``image``
- JSON ``{"image": "<base64 or data:image/...;base64,...>", "top_k": 3, "tta": true}``
- JSON ``{"instances": [{"image": ...}, ...]}``: answered with a list, in order
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handler.errors import (
    EmptyRequest,
    InvalidExplainClass,
    InvalidJSON,
    InvalidOption,
    RequestError,
    UnsupportedMediaType,
)

IMAGE_FIELDS = ("data", "file", "image", "body")
PROBE_HEADER = "x-readiness-probe"  # "true": the serving stack's supervisor probing; the gateway strips it from clients
OPTION_FIELDS = ("top_k", "tta", "explain_class")
TTA_MODES = ("off", "on", "all")
TTA_VALUES = {"on": "on", "true": "on", "1": "on", "yes": "on", "off": "off", "false": "off", "0": "off", "no": "off",
              "all": "all"}
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[\w.-]+)*;base64,", re.IGNORECASE)
_JSON_HINT = "Send JSON as {\"image\": \"<base64 or data: URL>\", \"top_k\": 3, \"tta\": true} or {\"instances\": [...]}."


class InvalidBase64(RequestError):
    reason = "invalid_base64"


@dataclass(frozen=True)
class Options:
    top_k: int | None = None  # None: the spec's default
    tta: str | None = None  # one of TTA_MODES; None: the spec's policy ("on")
    explain_class: int | None = None  # /explanations: the class to explain; None: the predicted one

    def merged(self, other: Options) -> Options:
        """``other``'s values where set, else ours (body fields over headers)."""
        return Options(
            top_k=other.top_k if other.top_k is not None else self.top_k,
            tta=other.tta if other.tta is not None else self.tta,
            explain_class=other.explain_class if other.explain_class is not None else self.explain_class,
        )


@dataclass(frozen=True)
class ParsedRequest:
    images: list[bytes]
    options: list[Options]  # one per image
    is_list: bool  # {"instances": [...]}: answer with a list
    from_json: bool = False  # the images came base64-encoded in a JSON body


def normalise_headers(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """Lower-case header names; drop TorchServe's per-parameter content-type entries."""
    return {str(k).lower(): v for k, v in (raw or {}).items() if isinstance(v, str)}


def parse_top_k(value: Any, num_classes: int, where: str) -> int:
    if isinstance(value, bool):
        value = None  # True is an int in Python; it is not a valid top_k
    elif isinstance(value, str) and re.fullmatch(r"\+?[0-9]{1,9}", value.strip(" \t\r\n")):  # int() refuses "¹", "0\x1f"
        value = int(value.strip(" \t\r\n"))
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= num_classes:
        raise InvalidOption(f"{where} must be an integer from 1 to {num_classes}; got {value_repr(value, where)}.")
    return value


def parse_explain_class(value: Any, class_names: tuple[str, ...], where: str) -> int:
    """A class index (0..K-1, as a number or digits) or a class name (any case) -> the class index."""
    k = len(class_names)
    if isinstance(value, (bytes, bytearray)):
        value = _text(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip(" \t\r\n")
        if re.fullmatch(r"\+?[0-9]{1,9}", text):
            value = int(text)
        else:
            by_name = {name.lower(): i for i, name in enumerate(class_names)}
            if text.lower() in by_name:
                return by_name[text.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < k:
        return value
    shown = class_names if k <= 20 else (*class_names[:5], "...", class_names[-1])
    names = ", ".join(json.dumps(n) if n != "..." else n for n in shown)
    raise InvalidExplainClass(f"{where} must be a class index from 0 to {k - 1} or a class name "
                              f"({names}); got {value_repr(value, where)}.")


def value_repr(value: Any, where: str) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(bytes(value))
    except (ValueError, TypeError, RecursionError):  # nested deeper than json.dumps can go here
        text = f"a nested {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def parse_tta_text(value: str, where: str) -> str:
    key = value.strip().lower()
    if key not in TTA_VALUES:
        raise InvalidOption(f"{where} must be one of {', '.join(TTA_VALUES)}; got {value_repr(value, where)}.")
    return TTA_VALUES[key]


def _class_names(classes: int | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(classes) if not isinstance(classes, int) else tuple(str(i) for i in range(classes))


def header_options(headers: Mapping[str, str], classes: int | tuple[str, ...]) -> Options:
    """Options from headers; ``classes`` is the model's class names (or just their number)."""
    names = _class_names(classes)
    top_k = headers.get("x-top-k")
    tta = headers.get("x-tta")
    explain_class = headers.get("x-explain-class")
    return Options(
        top_k=parse_top_k(top_k, len(names), "Header X-Top-K") if top_k is not None else None,
        tta=parse_tta_text(tta, "Header X-TTA") if tta is not None else None,
        explain_class=parse_explain_class(explain_class, names, "Header X-Explain-Class") if explain_class is not None else None,
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def form_options(item: Mapping[str, Any], classes: int | tuple[str, ...]) -> Options:
    names = _class_names(classes)
    top_k, tta, explain_class = item.get("top_k"), item.get("tta"), item.get("explain_class")
    return Options(
        top_k=parse_top_k(_text(top_k), len(names), 'Field "top_k"') if top_k is not None else None,
        tta=parse_tta_text(_text(tta), 'Field "tta"') if tta is not None else None,
        explain_class=parse_explain_class(_text(explain_class), names, 'Field "explain_class"')
        if explain_class is not None else None,
    )


def json_options(obj: Mapping[str, Any], classes: int | tuple[str, ...], where: str) -> Options:
    names = _class_names(classes)
    top_k = obj.get("top_k")
    tta = obj.get("tta")
    explain_class = obj.get("explain_class")
    if tta is not None and not isinstance(tta, (bool, str)):
        raise InvalidOption(f'{where}"tta" must be true, false or one of "off", "on", "all"; got {value_repr(tta, "tta")}.')
    if isinstance(tta, bool):
        tta = "on" if tta else "off"
    return Options(
        top_k=parse_top_k(top_k, len(names), f'{where}"top_k"') if top_k is not None else None,
        tta=parse_tta_text(tta, f'{where}"tta"') if tta is not None else None,
        explain_class=parse_explain_class(explain_class, names, f'{where}"explain_class"')
        if explain_class is not None else None,
    )


def decode_base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidJSON(f'{where}"image" must be a base64 string or a data: URL; got {type(value).__name__}.')
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split())  # line breaks from MIME-style encoders
    if not text:
        raise EmptyRequest(f'{where}"image" is empty. Put the base64-encoded image bytes there.')
    text += "=" * (-len(text) % 4)
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64(
            f'{where}"image" is not valid base64. Encode the image file bytes with standard or URL-safe '
            "base64, optionally prefixed with data:image/...;base64,"
        ) from None


def _image_object(obj: Any, classes: int | tuple[str, ...], where: str) -> tuple[bytes, Options]:
    if not isinstance(obj, dict):
        raise InvalidJSON(f"{where or 'The JSON body'} must be an object; got {type(obj).__name__}. {_JSON_HINT}")
    if "image" not in obj:
        raise InvalidJSON(f'{where or "The JSON body"} has no "image" field (it has {sorted(obj)[:8]}). {_JSON_HINT}')
    return decode_base64(obj["image"], where), json_options(obj, classes, where)


def parse_json(doc: Any, classes: int | tuple[str, ...], max_instances: int) -> tuple[list[bytes], list[Options], bool]:
    if isinstance(doc, dict) and "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidJSON('"instances" must be a non-empty list of {"image": ...} objects.')
        if len(instances) > max_instances:
            raise InvalidJSON(f'"instances" holds {len(instances)} items; the limit is {max_instances}. Split the request.')
        parsed = [_image_object(obj, classes, f"instances[{i}]: ") for i, obj in enumerate(instances)]
        return [p[0] for p in parsed], [p[1] for p in parsed], True
    image, options = _image_object(doc, classes, "")
    return [image], [options], False


def _looks_like_json(data: bytes) -> bool:
    return data[:1] in (b"{", b"[") or data.lstrip()[:1] in (b"{", b"[")


def _json_scalar(payload: Any, headers: Mapping[str, str]) -> str | None:
    """What a body sent as application/json holds when it is a JSON string, number or literal, else None.

    TorchServe hands a JSON string over as ``str`` (exactly ``application/json``) or
    leaves the bytes alone (``application/json; charset=...``); either would otherwise
    be read as image bytes and answered 415.  Image bytes mislabelled as JSON stay images.
    """
    if not headers.get("content-type", "").lower().startswith("application/json"):
        return None
    if isinstance(payload, str):
        return "a string"
    if not isinstance(payload, (bytes, bytearray)) or not payload.strip() or _looks_like_json(payload):
        return None
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return "a string" if isinstance(doc, str) else json.dumps(doc)[:20]


def parse_request(item: Mapping[str, Any], headers: Mapping[str, str], classes: int | tuple[str, ...], max_instances: int) -> ParsedRequest:
    """Find the image(s) and options of one request; raise a RequestError if it is malformed."""
    base = header_options(headers, classes)
    payload = next((item[k] for k in IMAGE_FIELDS if item.get(k) is not None), None)
    if payload is None and headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded"):
        raise UnsupportedMediaType(
            "The body was sent as application/x-www-form-urlencoded (curl -d/--data-binary does this by "
            "default), so TorchServe split it into form fields and the image bytes are lost. Send the file "
            "with -H 'Content-Type: application/octet-stream' (or curl -T image.png), as multipart "
            "(-F data=@image.png), or as JSON."
        )
    if payload is None and "body" in item:  # TorchServe parsed an application/json body of `null`
        raise InvalidJSON(f"The JSON body must be an object; got null. {_JSON_HINT}")
    if payload is None:
        fields = [k for k in item if k not in OPTION_FIELDS]
        if len(fields) == 1:  # a multipart upload under another field name
            payload = item[fields[0]]
    if payload is None:
        raise EmptyRequest(
            "The request has no image. Send the image bytes as the request body, as a multipart "
            'field "data", "file" or "image", or as JSON {"image": "<base64>"}.'
        )
    base = base.merged(form_options(item, classes))
    scalar = _json_scalar(payload, headers)
    if scalar is not None:
        raise InvalidJSON(f"The JSON body must be an object; got {scalar}. {_JSON_HINT}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)) and _looks_like_json(payload):
        try:
            payload = json.loads(bytes(payload).decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # also: integers over 4300 digits, nesting too deep
            raise InvalidJSON(f"The body starts like JSON but is not valid JSON ({exc}). {_JSON_HINT}") from None
    if isinstance(payload, (dict, list)):
        images, options, is_list = parse_json(payload, classes, max_instances)
        return ParsedRequest(images, [base.merged(o) for o in options], is_list, from_json=True)
    if not isinstance(payload, (bytes, bytearray)):
        raise InvalidJSON(f"The JSON body must be an object; got {type(payload).__name__}. {_JSON_HINT}")
    return ParsedRequest([bytes(payload)], [base], False)
