"""The Review tab's side of the feedback API: what to check next, and one label per click.

Like backend.py, nothing here imports Gradio. Calls go through the gateway's ``/feedback`` routes with the
**feedback key** from the key file, read on this machine at every request; the browser never sees it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import requests

from handler.record import NOT_A_GARMENT
from scripts.demo.backend import DEFAULT_URL, MODEL, _server_message, decode_png
from scripts.ops.tsclient import REPO, Endpoints, TorchServeClient

REASONS = {
    "out_of_distribution": "out of distribution: the model says it does not look like its training images",
    "uncertain": "uncertain: below the model's confidence threshold",
    "random sample": "a random sample of confident answers (keeps the labelled accuracy of confident answers unbiased)",
}


@dataclass
class Item:
    """One answer to check, or ``error`` / nothing left (``empty``)."""

    answer: dict | None = None
    error: str | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str | None:
        return f"{self.answer['request_id']}:{self.answer['index']}" if self.answer else None


class ReviewBackend:
    def __init__(self, url: str = DEFAULT_URL, key_file: Path | None = None, model: str = MODEL, timeout: float = 30.0):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.key_file = Path(key_file) if key_file else REPO / "key_file.json"

    def client(self) -> TorchServeClient:
        return TorchServeClient(Endpoints(inference=self.url), self.key_file, timeout=self.timeout)

    def _problem(self, resp: requests.Response | None, exc: Exception | None = None) -> str:
        if exc is not None:
            return (f"The feedback API at {self.url} is not reachable ({type(exc).__name__}). Is the service running? "
                    "`make serve`, then try again.")
        message = _server_message(resp)
        if resp.status_code == 401:
            return (f"The server refused the feedback key from {self.key_file} (HTTP 401): labelling needs the "
                    f"\"feedback\" key of the key file the server wrote.")
        if resp.status_code == 503:
            return f"Feedback is not available right now (HTTP 503): {message}"
        return f"The feedback API answered HTTP {resp.status_code}: {message}"

    def next_item(self, skip: list[str] | None = None) -> Item:
        """The first answer of the review queue not in ``skip`` ("request_id:index" strings)."""
        try:
            resp = self.client().request("feedback", "GET", f"/feedback/{self.model}/review", check=False,
                                         params={"limit": 1, "skip": ",".join(skip or [])})
        except (requests.RequestException, OSError, ValueError) as exc:
            return Item(error=self._problem(None, exc))
        if resp.status_code != 200:
            return Item(error=self._problem(resp))
        body = resp.json()
        items = body.get("items") or []
        return Item(answer=items[0] if items else None, classes=list(body.get("classes") or []))

    def label(self, answer: dict, label: str) -> tuple[bool, str]:
        """Post one label for ``answer``; (recorded, a sentence for the person)."""
        doc = {"request_id": answer["request_id"], "index": answer["index"], "label": label}
        try:
            resp = self.client().label(self.model, doc, check=False)
        except (requests.RequestException, OSError, ValueError) as exc:
            return False, self._problem(None, exc)
        if resp.status_code == 200:
            result = resp.json()
            said = answer["label"]
            verdict = "right" if label == said else "wrong"
            return True, (f"Recorded \"{result['label']}\" for {answer['request_id']}: the model said {said} "
                          f"({verdict}).")
        if resp.status_code == 409:
            return True, f"Already labelled differently; the first label stands: {_server_message(resp)}"
        return False, self._problem(resp)


def item_html(item: Item) -> str:
    """The answer under review as HTML (with its request id in data- attributes for tools and tests)."""
    if item.error:
        return f'<div id="demo-review-error" class="demo-error">{html.escape(item.error)}</div>'
    if item.answer is None:
        return '<div id="demo-review-empty">Nothing to review right now: every answer of the review sample is labelled.</div>'
    a = item.answer
    reason = REASONS.get(a["reason"], a["reason"])
    return (f'<div id="demo-review-item" data-request-id="{html.escape(a["request_id"])}" data-index="{a["index"]}" '
            f'data-label="{html.escape(a["label"])}">'
            f'<p><b>The model said: {html.escape(a["label"])}</b> ({100 * float(a["confidence"]):.1f} %, version '
            f'{html.escape(str(a["version"]))}).</p>'
            f'<p>Why it is here: {html.escape(reason)}.</p>'
            f'<p class="demo-review-id">Request {html.escape(a["request_id"])}'
            f'{", image " + str(a["index"]) if a["index"] else ""}.</p>'
            "<p>What is it? One click records the label.</p></div>")


def item_images(item: Item):
    """(the canonical input, enlarged; the raw upload when the stack keeps them) as PIL images or None."""
    if not item.answer:
        return None, None
    upload = None
    if item.answer.get("upload"):
        import io

        from PIL import Image

        try:
            upload = Image.open(io.BytesIO(base64.b64decode(item.answer["upload"])))
            upload.load()
        except Exception:  # an upload Pillow cannot show is left out
            upload = None
    return decode_png(item.answer["input_png"]), upload


def choices(classes: list[str]) -> list[str]:
    return [*classes, NOT_A_GARMENT]
