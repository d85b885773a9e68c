"""The demo's side of the inference API: one call per image through the gateway, every failure a sentence.

Nothing here imports Gradio, so the logic is testable (and importable) without it. The key is read
from the key file by :class:`~scripts.ops.tsclient.TorchServeClient` at every request, on this
machine; the browser only ever sees answers and messages.

The gateway's keys do not expire. A 401 therefore means the key file changed under us (``make serve``
regenerates keys when the file is deleted) or points at another server's keys: the request is sent
once more with what the file holds now, and if that is refused too the message says so plainly.
Against a bare TorchServe (expiring keys and an API key in the file), the client renews the key
through the token API by itself.
"""

from __future__ import annotations

import base64
import html
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from PIL import Image, ImageDraw, ImageOps

from scripts.ops.tsclient import REPO, Endpoints, TorchServeClient

MODEL = "fashion_cnn"
DEFAULT_URL = "http://127.0.0.1:8080"
MAX_MESSAGE = 300  # characters of a server message shown to a person


@dataclass
class Outcome:
    """One image's result: the API's JSON answer, or ``error`` (a sentence for a person)."""

    answer: dict | None = None
    error: str | None = None
    status: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.answer is not None


def _server_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = body.get("message") or body.get("error") or resp.text
    else:
        text = resp.text
    text = " ".join(str(text).split())
    return text[:MAX_MESSAGE] + ("..." if len(text) > MAX_MESSAGE else "")


class DemoBackend:
    """Classifies images through ``url`` (the gateway's public inference address) with the key in ``key_file``."""

    def __init__(self, url: str = DEFAULT_URL, key_file: Path | None = None, model: str = MODEL,
                 timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.key_file = Path(key_file) if key_file else REPO / "key_file.json"
        self.model = model
        self.timeout = timeout
        self._local = threading.local()  # one requests.Session per thread (the gallery calls in parallel)
        self._description: dict | None = None

    def client(self) -> TorchServeClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = TorchServeClient(Endpoints(inference=self.url), self.key_file, timeout=self.timeout)
            self._local.client = client
        return client

    # --- messages ----------------------------------------------------------------------------
    def _down(self, exc: Exception) -> str:
        what = "did not answer in time" if isinstance(exc, requests.Timeout) else "is not reachable"
        return (f"The inference server at {self.url} {what}. Is it running? Start it with `make serve` "
                f"(or check `make status`), then try again.")

    def _key_refused(self, first: str | None, second: str | None) -> str:
        if second is None:
            return (f"No inference key: {self.key_file} is missing or has no inference key. `make serve` writes it; "
                    f"start the server (or point the demo at its file with --key-file), then try again.")
        changed = "it now holds a different key, refused too" if first != second else "it holds the same key"
        return (f"The server refused the inference key from {self.key_file} (re-read after the first refusal: "
                f"{changed}). The keys were probably regenerated for another server: restart the server with "
                f"`make serve` or point the demo at the key file that server wrote (--key-file).")

    # --- calls -------------------------------------------------------------------------------
    def _post(self, data: bytes, headers: dict, explain: bool) -> requests.Response:
        return self.client().predict(self.model, data, headers=headers, explain=explain, check=False)

    def classify(self, data: bytes, *, tta: bool = True, explain: bool = False, top_k: int | None = None) -> Outcome:
        """One image -> its answer (``/explanations`` when ``explain``), or a sentence saying why not."""
        if not data:
            return Outcome(error="The file is empty: choose an image.")
        headers = {"X-TTA": "on" if tta else "off"}
        if top_k:
            headers["X-Top-K"] = str(top_k)
        notes: list[str] = []
        try:
            first_key = self.client().key("inference")
            resp = self._post(data, headers, explain)
            if resp.status_code == 401:
                second_key = self.client().key("inference")
                resp = self._post(data, headers, explain)
                if resp.status_code == 401:
                    return Outcome(error=self._key_refused(first_key, second_key), status=401)
                notes.append("The key file had changed: the key was re-read and accepted.")
        except (requests.ConnectionError, requests.Timeout) as exc:
            return Outcome(error=self._down(exc))
        except requests.RequestException as exc:
            return Outcome(error=f"The request to {self.url} failed: {type(exc).__name__}.")
        except (OSError, ValueError) as exc:  # the key file exists but cannot be read or parsed
            return Outcome(error=f"Cannot read the key file {self.key_file}: {type(exc).__name__}. "
                                 f"`make serve` writes it; check it is readable and valid JSON.")
        return self._outcome(resp, notes)

    def _outcome(self, resp: requests.Response, notes: list[str]) -> Outcome:
        status = resp.status_code
        if status == 200:
            try:
                answer = resp.json()
            except ValueError:
                answer = None
            if isinstance(answer, dict) and "label" in answer:
                return Outcome(answer=answer, status=200, notes=notes)
            return Outcome(error=f"The server answered something that is not a prediction: "
                                 f"{' '.join(resp.text.split())[:MAX_MESSAGE]}", status=200)
        message = _server_message(resp)
        if status in (502, 503, 504):
            return Outcome(status=status, error=(
                f"The gateway at {self.url} is up, but no model server behind it could answer now "
                f"(HTTP {status}: {message}). If this lasts, check `make status`."))
        if status == 429:
            return Outcome(status=status, error=f"The gateway is turning requests away for now (HTTP 429: {message}).")
        if 400 <= status < 500:
            return Outcome(status=status, error=f"The server could not use this file (HTTP {status}): {message}")
        return Outcome(status=status, error=f"The server failed (HTTP {status}): {message}")

    def classify_many(self, items: list[bytes], *, tta: bool = True, parallel: int = 8) -> list[Outcome]:
        """Several images, ``parallel`` requests in flight (the server batches them); answers in order."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items)))) as pool:
            return list(pool.map(lambda data: self.classify(data, tta=tta), items))

    def readiness(self) -> str:
        """One sentence on the server: ready, up but unable to serve, or unreachable (GET /ping needs no key)."""
        try:
            resp = self.client().session.get(f"{self.url}/ping", timeout=min(self.timeout, 10))
        except (requests.ConnectionError, requests.Timeout) as exc:
            return self._down(exc)
        except requests.RequestException as exc:
            return f"The inference server at {self.url} could not be asked: {type(exc).__name__}."
        if resp.status_code != 200:
            return (f"The server at {self.url} is up but cannot serve a prediction now (HTTP {resp.status_code}); "
                    f"check `make status`.")
        try:
            key = self.client().key("inference")
        except (OSError, ValueError) as exc:
            return f"Cannot read the key file {self.key_file}: {type(exc).__name__}."
        if not key:
            return self._key_refused(None, None)
        return f"Server ready at {self.url} (model {self.model})."

    def description(self) -> dict | None:
        """The model's description (classes, confidence threshold, ...), fetched once; None when unavailable."""
        if self._description is None:
            try:
                resp = self.client().predict(self.model, b"{}", headers={"describe": "true"}, check=False)
                body = resp.json() if resp.status_code == 200 else None
                if isinstance(body, dict) and "threshold" in body:
                    self._description = body
            except (requests.RequestException, OSError, ValueError):
                return None
        return self._description

    def confidence_threshold(self) -> float | None:
        description = self.description()
        value = description.get("threshold") if description else None
        return float(value) if isinstance(value, int | float) else None


# --- presenting an answer --------------------------------------------------------------------------
def label_value(answer: dict) -> dict[str, float]:
    """``top_k`` as {label: probability}, what gr.Label draws as bars."""
    return {entry["label"]: float(entry["probability"]) for entry in answer.get("top_k", [])}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def badges(answer: dict, threshold: float | None = None) -> list[tuple[str, str, str]]:
    """[(css class, badge, sentence)] for an answer: out of distribution, uncertain, or confident."""
    out = []
    confidence = float(answer.get("confidence", 0.0))
    if answer.get("out_of_distribution"):
        ood = answer.get("ood") if isinstance(answer.get("ood"), dict) else {}
        score, limit = answer.get("ood_score"), ood.get("threshold")
        detail = f" (score {score:.2f}, flagged above {limit:.2f})" if isinstance(score, int | float) and isinstance(limit, int | float) else ""
        out.append(("demo-badge-ood", "Out of distribution",
                    "This image does not look like anything the model was trained on (one garment, centred on a "
                    "plain background)" + detail + ": the label is only the garment it resembles most, so do not "
                    "trust it."))
    if answer.get("uncertain") and not (confidence >= (threshold or 0) and answer.get("out_of_distribution")):
        limit = f", below the model's threshold of {_pct(threshold)}" if threshold is not None else ""
        out.append(("demo-badge-uncertain", "Uncertain",
                    f"The model's confidence is {_pct(confidence)}{limit}: answers this unsure are wrong too often, "
                    f"so treat the label as a guess."))
    if not out:
        limit = f", above the model's threshold of {_pct(threshold)}" if threshold is not None else ""
        out.append(("demo-badge-confident", "Confident",
                    f"Confidence {_pct(confidence)}{limit}, on an image like the training data."))
    return out


def badges_html(answer: dict, threshold: float | None = None) -> str:
    rows = "".join(
        f'<div class="demo-badge-row"><span class="demo-badge {cls}">{html.escape(name)}</span> '
        f'<span class="demo-badge-text">{html.escape(sentence)}</span></div>'
        for cls, name, sentence in badges(answer, threshold))
    label = html.escape(str(answer.get("label", "")))
    return f'<div id="demo-verdict" data-label="{label}">{rows}</div>'


def error_html(message: str) -> str:
    return f'<div id="demo-error" class="demo-error">{html.escape(message)}</div>'


def details_markdown(answer: dict, notes: list[str] | None = None) -> str:
    views = answer.get("tta_views")
    tta = f"{views} test-time-augmentation views merged" if views and views > 1 else "one view (TTA off)"
    lines = [f"**{answer.get('label')}** (class {answer.get('class_index')}), confidence {_pct(float(answer.get('confidence', 0)))}; "
             f"{tta}."]
    explanation = answer.get("explanation")
    if isinstance(explanation, dict):
        lines.append(f"Heatmap: `{explanation.get('method')}` for *{explanation.get('label')}*, brighter = mattered more.")
    lines += list(notes or [])
    return "\n\n".join(lines)


def decode_png(b64: str | None, scale_to: int = 224) -> Image.Image | None:
    """A base64 PNG from the explanation, enlarged with nearest-neighbour so each model pixel stays visible."""
    if not b64:
        return None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    if max(image.size) < scale_to:
        factor = max(1, scale_to // max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image


def region_image(data: bytes | None, region: dict | None, longest: int = 320) -> Image.Image | None:
    """The upload as the server saw it (upright) with the region canonicalisation took the garment from drawn
    on it; None when the upload cannot be shown or no region was found."""
    if not data or not region:
        return None
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    except Exception:  # a format this process cannot show (the server may still have answered it)
        return None
    image.thumbnail((longest, longest))
    w, h = image.size
    box = [region["left"] * w, region["top"] * h, region["right"] * w, region["bottom"] * h]
    ImageDraw.Draw(image).rectangle(box, outline=(230, 40, 40), width=max(2, longest // 120))
    return image


def caption(outcome: Outcome) -> str:
    """A short gallery caption: label, confidence and flags, or the error."""
    if not outcome.ok:
        return f"error: {outcome.error}"
    answer = outcome.answer
    flag = " · OOD" if answer.get("out_of_distribution") else " · uncertain" if answer.get("uncertain") else ""
    return f"{answer['label']} {100 * float(answer['confidence']):.0f} %{flag}"
