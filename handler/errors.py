"""Named request errors: each maps to one HTTP status and says what to do instead.

A handler answers a bad request by returning ``error.to_body()`` for that request
alone and setting its status with ``context.set_response_status``; nothing a
client sends may raise out of ``handle()`` (that would fail the whole batch).
"""

from __future__ import annotations


class SpecError(ValueError):
    """A spec or handler setting is invalid; raised at load time, never per request."""


class RequestError(Exception):
    """Base class: ``status`` is the HTTP code, ``reason`` the metric label."""

    status = 400
    phrase = "Bad Request"
    reason = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_body(self) -> dict:
        return {"code": self.status, "type": self.type, "message": self.message}


class EmptyRequest(RequestError):
    reason = "empty"


class InvalidImage(RequestError):
    """Looks like a supported image format but cannot be decoded (truncated, corrupt)."""

    reason = "invalid_image"


class UnsupportedMediaType(RequestError):
    """Not an image in any accepted raster format (text, PDF, SVG, random bytes...)."""

    status = 415
    phrase = "Unsupported Media Type"
    reason = "unsupported_format"


class ImageTooLarge(RequestError):
    """Decoded size (pixels or frames) over the configured limit; checked before decoding pixels."""

    status = 413
    phrase = "Payload Too Large"
    reason = "too_large"


class InvalidJSON(RequestError):
    reason = "invalid_json"


class InvalidOption(RequestError):
    """A per-request option (top_k, tta) has a value outside what is accepted."""

    reason = "invalid_option"


class InvalidExplainClass(RequestError):
    """``X-Explain-Class`` / ``explain_class`` names no class of the model."""

    reason = "invalid_explain_class"


class InternalError(RequestError):
    """A bug met while handling one request: answered 500 for that request alone, logged with
    its traceback, so one odd upload cannot fail its batch neighbours."""

    status = 500
    phrase = "Internal Server Error"
    reason = "internal_error"


def known_reasons() -> tuple[str, ...]:
    """Every ``reason`` a RequestError subclass defined so far carries (the ``RejectedRequests`` label values)."""
    seen, todo = [], [RequestError]
    while todo:
        cls = todo.pop()
        if cls.reason not in seen:
            seen.append(cls.reason)
        todo.extend(cls.__subclasses__())
    return tuple(sorted(seen))
