"""Every answer recorded: one JSON line per answered image, appended to a bounded local spool.

The worker appends; the recorder beside the serving stack (``scripts/deploy/recorder.py``) ingests
the spool into the store (SQLite or PostgreSQL), so the ``.mar`` needs no database driver and a
store that is slow or down never slows or fails a prediction. The lines of a batch are written
with one ``write()`` before ``handle()`` returns, so an answer a client received is in the spool
(the page cache: it survives ``kill -9`` of the worker or the frontend) before it left the worker.

Configured by the serving stack, never by the archive: the environment variable ``SERVE_RECORD_SETTINGS``
names a JSON file ``{"spool": dir, "max_spool_bytes": n, "review_share": 0.05, "keep_uploads": false,
"max_upload_bytes": n}``; without it (a TorchServe started by hand, the unit tests' default) nothing
is recorded. Each worker writes its own segments ``<spool>/<host>-<pid>-<start>-<seq>.jsonl``, a
``model`` line (name, version, class names) first, then one ``answer`` line per image:

    {"type": "answer", "time", "model", "version", "request_id", "item", "label", "class_index",
     "confidence", "uncertain", "ood", "ood_score", "tta_views", "review",
     "input": {"shape": [h, w, c], "zlib": "<base64>"}, "upload": "<base64>" | null}

``input`` is the canonical image the model saw (uint8, recovered exactly from the normalised tensor),
so a corrected answer can be trained on; ``upload`` (the raw bytes) only with ``keep_uploads`` and only
for the review sample. Recording never raises out of ``handle()``: a failure is counted per reason
(``RecordLost``) and the answers go out as usual. When the spool holds ``max_spool_bytes`` (the
recorder is down), new answers are dropped and counted (``spool_full``) rather than filling the disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handler.request import header_options, normalise_headers, parse_request

logger = logging.getLogger(__name__)

RECORD_ENV = "SERVE_RECORD_SETTINGS"
FORMAT = 1
NOT_A_GARMENT = "not a garment"  # the label a person gives an input that is no garment (any model: "not a <thing>")
FLAGS = ("confident", "uncertain", "out_of_distribution")  # the strata answers are reported by
LOSS_REASONS = ("spool_full", "write_error", "error")
SEGMENT_BYTES = 4 * 2**20
SIZE_CHECK_S = 1.0


def flag(uncertain: bool, ood: bool) -> str:
    """The stratum of an answer: out of distribution (which is also uncertain), uncertain, or confident."""
    return "out_of_distribution" if ood else "uncertain" if uncertain else "confident"


def review_draw(request_id: str, item: int) -> float:
    """A uniform number in [0, 1) fixed by the request id and the image's index: the same for every version
    that answers the request (shadow, canary), on every replica."""
    digest = hashlib.blake2b(f"{request_id}\x00{item}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_review_sample(request_id: str, item: int, uncertain: bool, ood: bool, share: float) -> bool:
    """Shown for review: every uncertain or out-of-distribution answer, and ``share`` of the confident ones,
    drawn at random (``review_draw``) so labelled confident answers estimate their accuracy without bias."""
    return bool(uncertain or ood or review_draw(request_id, item) < share)


@dataclass(frozen=True)
class Settings:
    spool: Path
    max_spool_bytes: int = 256 * 2**20
    review_share: float = 0.05
    keep_uploads: bool = False
    max_upload_bytes: int = 2 * 2**20

    @classmethod
    def from_env(cls) -> Settings | None:
        path = os.environ.get(RECORD_ENV)
        if not path:
            return None
        doc = json.loads(Path(path).read_text())
        return cls(Path(doc["spool"]), int(doc.get("max_spool_bytes", cls.max_spool_bytes)),
                   float(doc.get("review_share", cls.review_share)), bool(doc.get("keep_uploads", False)),
                   int(doc.get("max_upload_bytes", cls.max_upload_bytes)))


class SpoolFull(Exception):
    pass


class Spool:
    """This process's append-only segments in ``directory``, bounded by the whole folder's size."""

    def __init__(self, directory: Path, max_bytes: int, header: bytes, segment_bytes: int = SEGMENT_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.segment_bytes, self.header = max_bytes, segment_bytes, header
        self.prefix = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.seq, self.fd, self.written = -1, None, 0
        self.folder_bytes, self.checked_at = 0, 0.0

    def _folder_bytes(self) -> int:
        total = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    total += entry.stat().st_size
                except OSError:  # ingested and deleted meanwhile
                    pass
        return total

    def _open_next(self) -> None:
        self.seq += 1
        path = self.directory / f"{self.prefix}-{self.seq:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, self.header)
        old, self.fd, self.written = self.fd, fd, len(self.header)
        if old is not None:  # the recorder deletes a segment once a newer one of the same writer exists
            os.close(old)

    def append(self, payload: bytes) -> None:
        now = time.monotonic()
        if now - self.checked_at >= SIZE_CHECK_S:
            self.folder_bytes, self.checked_at = self._folder_bytes(), now
        if self.folder_bytes + len(payload) > self.max_bytes:
            raise SpoolFull(f"{self.directory} holds {self.folder_bytes} bytes (limit {self.max_bytes})")
        if self.fd is None or self.written + len(payload) > self.segment_bytes:
            self._open_next()
        try:
            n = os.write(self.fd, payload)
            if n != len(payload):
                raise OSError(f"short write: {n} of {len(payload)} bytes")
        except OSError:  # a torn tail stays at the end of this segment: the next batch starts a new one
            os.close(self.fd)
            self.fd = None
            raise
        self.written += len(payload)
        self.folder_bytes += len(payload)


def canonical_uint8(tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The normalised model input (C, H, W) back to the 8-bit image it was made from, (H, W, C).

    ``handler.preprocess.to_tensor`` maps each 8-bit value v to ((v / 255) - mean) / std in float32; undoing it
    in float64 lands within 1e-4 of v, so rounding gives v exactly."""
    arr = tensor.detach().cpu().numpy().astype(np.float64)
    c = arr.shape[0]
    arr = arr * np.asarray(std, dtype=np.float64).reshape(c, 1, 1) + np.asarray(mean, dtype=np.float64).reshape(c, 1, 1)
    return np.rint(arr * 255.0).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)


def encode_input(image: np.ndarray) -> dict:
    return {"shape": list(image.shape), "zlib": base64.b64encode(zlib.compress(image.tobytes(), 1)).decode("ascii")}


def decode_input(field: dict) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(field["zlib"])), dtype=np.uint8).reshape(field["shape"])


class Recorder:
    """Bound to one model version in one worker: turns a batch's answers into spool lines."""

    def __init__(self, settings: Settings, spec, model_name: str, version: str):
        self.settings, self.spec, self.model, self.version = settings, spec, model_name, version
        header = {"v": FORMAT, "type": "model", "time": time.time(), "model": model_name, "version": version,
                  "classes": list(spec.class_names)}
        self.spool = Spool(settings.spool, settings.max_spool_bytes, (json.dumps(header) + "\n").encode())

    @classmethod
    def from_env(cls, spec, model_name: str, version: str) -> Recorder | None:
        try:
            settings = Settings.from_env()
            return None if settings is None else cls(settings, spec, model_name, version)
        except Exception:  # a broken setting must not stop the model from serving: it is logged, nothing recorded
            logger.exception("Recording is off: %s could not be read", os.environ.get(RECORD_ENV))
            return None

    def record(self, answered: list, data: list, context) -> tuple[int, Counter]:
        """``answered``: (index in the batch, Prepared slot, [ImageResult], [answer dict]) per answered request.
        Returns (answers recorded, Counter of losses by reason); never raises."""
        lost: Counter = Counter()
        n = sum(len(answers) for _, _, _, answers in answered)
        if not n:
            return 0, lost
        try:
            lines = []
            now = time.time()
            for idx, slot, _result, answers in answered:
                headers = normalise_headers(context.get_all_request_header(idx))
                request_id = str(headers.get("x-request-id") or context.get_request_id(idx))
                for item, (tensor, answer) in enumerate(zip(slot.tensors, answers)):
                    review = in_review_sample(request_id, item, answer["uncertain"], answer["out_of_distribution"],
                                              self.settings.review_share)
                    lines.append(json.dumps({
                        "v": FORMAT, "type": "answer", "time": now, "model": self.model, "version": self.version,
                        "request_id": request_id, "item": item, "label": answer["label"],
                        "class_index": answer["class_index"], "confidence": answer["confidence"],
                        "uncertain": answer["uncertain"], "ood": answer["out_of_distribution"],
                        "ood_score": answer["ood_score"], "tta_views": answer["tta_views"], "review": review,
                        "input": encode_input(canonical_uint8(tensor, self.spec.mean, self.spec.std)),
                        "upload": self._upload(data[idx], headers, item, slot) if review else None,
                    }))
            self.spool.append(("\n".join(lines) + "\n").encode())
            return n, lost
        except SpoolFull:
            lost["spool_full"] += n
        except OSError as exc:
            logger.warning("Answers not recorded (%s): %s", type(exc).__name__, exc)
            lost["write_error"] += n
        except Exception:  # a bug here must never fail the batch
            logger.exception("Answers not recorded")
            lost["error"] += n
        return 0, lost

    def _upload(self, item, headers: dict, index: int, slot) -> str | None:
        """The raw bytes of image ``index`` of the request, when uploads are kept (review sample only)."""
        if not self.settings.keep_uploads:
            return None
        from handler import v2

        spec = self.spec
        if slot.v2 is not None:
            parsed, _ = v2.parse(item, header_options(headers, spec.class_names), spec.class_names,
                                 spec.limits.max_instances, headers)
        else:
            parsed = parse_request(item, headers, spec.class_names, spec.limits.max_instances)
        data = parsed.images[index]
        return base64.b64encode(data).decode("ascii") if len(data) <= self.settings.max_upload_bytes else None
