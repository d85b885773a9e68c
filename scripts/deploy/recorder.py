"""The recorder: ingests the workers' spool into the feedback store and serves the feedback API.

    python -m scripts.deploy.recorder --spool run/spool --socket run/feedback.sock --store run/feedback.sqlite3

A child of the supervisor (scripts/deploy/supervisor.py), restarted when it dies, beside the serving stack:

- every ``--interval`` seconds it reads what the workers appended to ``<spool>/**/*.jsonl`` (handler/record.py)
  and adds it to the store in one transaction with the new read offset, so a recorder killed at any point
  neither loses nor doubles an answer; a segment is deleted once it is read to its end and its writer has moved
  on (a newer segment of the same writer exists, or the writer's process is gone);
- it serves, on a Unix socket only the gateway reaches (the gateway checks the credential first):

  ==========================================  ================================================================
  ``POST /feedback/<model>``                  labels: ``{"request_id", "label"[, "index"]}`` or a list (all or none)
  ``GET /feedback/<model>/summary``           per version: labelled, correct, accuracy, 95 % interval, by flag/label
  ``GET /feedback/<model>/review?limit=N``    what to label next, with the canonical input as a PNG
  ``GET /feedback/<model>/export?after=&limit=``  labelled answers with their inputs (management port only)
  ``GET /feedback/<model>/compare?baseline=&candidate=&limit=``  both versions' answers to the same requests, side
                                              by side, with the label given where there is one (management port only;
                                              ``ctl compare``)
  ``GET /metrics``                            ``feedback_*`` counters from the store, the recorder's own
  ==========================================  ================================================================

  A label is acknowledged (200) only after its transaction committed (SQLite: WAL with ``synchronous=FULL``;
  PostgreSQL: a commit), so no acknowledged label is lost when any process is killed. A label for an answer
  not ingested yet triggers an ingestion pass first (the worker wrote the answer's line before answering);
- every ``--prune-interval`` seconds it applies the retention: unlabelled answers older than
  ``--retention-days`` and, oldest first, beyond ``--retention-mb``.

The store is an SQLite file (a path) or PostgreSQL (a DSN: ``postgresql://user:password@host/db``, for several
replicas or hosts; every host runs its own recorder on its own spool, all into the same database).
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import logging
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image

from scripts.deploy.store import (
    FeedbackError,
    MalformedFeedback,
    Store,
    StoreUnavailable,
    UnknownModel,
    UnknownRequest,
    parse_body,
    redact,
)

log = logging.getLogger("recorder")
ROUTE = re.compile(r"^/feedback/([A-Za-z0-9._-]+)(?:/(summary|review|export|compare))?$")
VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_BODY = 1 * 2**20
API_HEADER = "X-Feedback-Api"  # set by the gateway: "feedback" (inference port, feedback key) or "management"


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spool", type=Path, required=True, help="the folder the workers spool into (one sub-folder per replica)")
    p.add_argument("--socket", type=Path, required=True, help="Unix socket of the feedback API (the gateway proxies to it)")
    p.add_argument("--store", default=env("FEEDBACK_STORE"),
                   help="SQLite file path, or a PostgreSQL DSN (postgresql://...); default: env FEEDBACK_STORE")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between ingestion passes")
    p.add_argument("--retention-days", type=float, default=float(env("FEEDBACK_RETENTION_DAYS", "30")),
                   help="unlabelled answers older than this are deleted (0: kept)")
    p.add_argument("--retention-mb", type=float, default=float(env("FEEDBACK_RETENTION_MB", "1024")),
                   help="the answers' inputs and uploads are kept under this size, oldest unlabelled deleted first (0: no limit)")
    p.add_argument("--prune-interval", type=float, default=60.0, help="seconds between retention passes")
    p.add_argument("--rollout-state", type=Path, default=None,
                   help="the supervisor's rollout.json: the comparison's gauges follow its live and candidate versions")
    p.add_argument("--wait-for-answer", type=float, default=3.0,
                   help="a label for an answer not in the store yet waits this long for another host's recorder to add it")
    return p


def png(shape: list[int], data: bytes) -> str:
    """A stored canonical input (zlib-compressed uint8, shape h, w, c) as a base64 PNG."""
    arr = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(shape)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def writer_alive(segment: Path) -> bool:
    """Whether the process that writes ``<host>-<pid>-<start>-<seq>.jsonl`` still runs (on this host)."""
    try:
        host, pid = segment.name.rsplit("-", 3)[0], int(segment.name.rsplit("-", 3)[1])
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # another host's spool mounted here: wait for a newer segment instead
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Recorder:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.store: Store | None = None
        self.store_error = "not connected yet"
        self.ingest_lock = threading.Lock()
        self.stopping = threading.Event()
        self.counters = {"ingested": 0, "ingest_errors": 0, "bad_lines": 0, "pruned": 0, "segments_done": 0}
        self.host = socket.gethostname()

    # --- the store --------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Open (and migrate) the store, retrying until it answers: the API says 503 meanwhile."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.store = Store(self.args.store)
                log.info("store ready: %s", redact(self.args.store))
                return
            except Exception as exc:  # PostgreSQL not up yet, a locked file: keep the socket up and try again
                self.store_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.warning("store %s not ready (%s); retrying in %.1f s", redact(self.args.store), self.store_error, delay)
                self.stopping.wait(delay)
                delay = min(10.0, delay * 2)

    def need_store(self) -> Store:
        if self.store is None:
            raise StoreUnavailable(f"The feedback store is not reachable yet ({self.store_error}); retry in a few seconds.")
        return self.store

    # --- ingestion -----------------------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        return sorted(self.args.spool.rglob("*.jsonl"))

    def ingest_now(self) -> int:
        """One pass over every segment; returns the answers added."""
        store = self.need_store()
        added = 0
        with self.ingest_lock:
            segments = self.segments()
            newest = {}
            for seg in segments:  # writer prefix -> its newest segment
                newest[seg.parent / seg.name.rsplit("-", 1)[0]] = seg
            for seg in segments:
                finished = newest[seg.parent / seg.name.rsplit("-", 1)[0]] != seg or not writer_alive(seg)
                key = f"{self.host}:{seg.relative_to(self.args.spool)}"
                try:
                    added += self._ingest_segment(store, seg, key, finished)
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    self.counters["ingest_errors"] += 1
                    log.warning("ingesting %s failed: %s", seg, exc)
        self.counters["ingested"] += added
        return added

    def _ingest_segment(self, store: Store, seg: Path, key: str, finished: bool) -> int:
        offset = store.offset(key)
        try:
            with open(seg, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1  # complete lines only: a line being written is read next time
        added = 0
        if end:
            lines = []
            for raw in data[:end].splitlines():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    self.counters["bad_lines"] += 1
            added = store.ingest(key, offset + end, lines)
        if finished:  # nothing more will be written to it: what is left past the last newline is a torn write
            if len(data) > end:
                self.counters["bad_lines"] += 1
            seg.unlink(missing_ok=True)
            store.forget_segment(key)
            self.counters["segments_done"] += 1
        return added

    def spool_bytes(self) -> int:
        total = 0
        for seg in self.segments():
            try:
                total += seg.stat().st_size
            except OSError:
                pass
        return total

    def run_ingest(self) -> None:
        while not self.stopping.wait(self.args.interval):
            if self.store is None:
                continue
            try:
                self.ingest_now()
            except Exception as exc:
                self.counters["ingest_errors"] += 1
                log.warning("ingestion pass failed: %s", exc)

    def run_prune(self) -> None:
        while not self.stopping.wait(self.args.prune_interval):
            if self.store is None:
                continue
            try:
                age = self.args.retention_days * 86400 if self.args.retention_days > 0 else None
                size = int(self.args.retention_mb * 2**20) if self.args.retention_mb > 0 else None
                removed = self.store.prune(age, size)
                if removed:
                    self.counters["pruned"] += removed
                    log.info("retention: %d unlabelled answers deleted", removed)
            except Exception as exc:
                log.warning("retention pass failed: %s", exc)

    # --- the API --------------------------------------------------------------------------------------------
    def label(self, model: str, body: bytes) -> dict:
        try:
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedFeedback(f"The body is not valid JSON ({exc}). Send "
                                    '{"request_id": "<X-Request-ID of the answer>", "label": "<class name>"}.') from None
        labels = parse_body(doc)
        store = self.need_store()
        try:
            results = store.label(model, labels)
        except (UnknownRequest, UnknownModel):
            self.ingest_now()  # the worker spooled the answer before answering: it may just not be read yet
            deadline = time.monotonic() + self.args.wait_for_answer
            while True:
                try:
                    results = store.label(model, labels)
                    break
                except (UnknownRequest, UnknownModel):  # another host's recorder may add it within its interval
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.25)
        return results[0] if isinstance(doc, dict) and "labels" not in doc else {"labels": results}

    def review(self, model: str, query: dict) -> dict:
        limit = _int(query, "limit", 10, 1, 100)
        skip = []
        for token in query.get("skip", [""])[0].split(","):
            if ":" in token:
                rid, _, idx = token.rpartition(":")
                if idx.isdigit():
                    skip.append((rid, int(idx)))
        items = self.need_store().review(model, limit=limit, skip=skip)
        out = []
        for it in items:
            it = dict(it)
            it["input_png"] = png(it.pop("input_shape"), it.pop("input"))
            upload = it.pop("upload")
            it["upload"] = base64.b64encode(upload).decode("ascii") if upload else None
            out.append(it)
        classes = list(items[0]["classes"]) if items else list(self.need_store().model_classes(model))
        for it in out:
            it.pop("classes", None)
        return {"model": model, "items": out, "classes": classes}

    def export(self, model: str, query: dict) -> dict:
        after, limit = _int(query, "after", 0, 0, 2**62), _int(query, "limit", 500, 1, 2000)
        items = self.need_store().labelled(model, after=after, limit=limit)
        for it in items:
            it["input_png"] = png(it.pop("input_shape"), it.pop("input"))
        return {"model": model, "items": items, "next": items[-1]["id"] if len(items) == limit else None}

    def compare(self, model: str, query: dict) -> dict:
        versions = {}
        for name in ("baseline", "candidate"):
            value = query.get(name, [""])[0]
            if not VERSION.match(value):
                raise MalformedFeedback(f"?{name}= must name a version ([A-Za-z0-9._-]); got {value[:70]!r}.")
            versions[name] = value
        self.ingest_now()  # what the workers spooled up to now
        return self.need_store().compare(model, versions["baseline"], versions["candidate"],
                                         limit=_int(query, "limit", 100_000, 1, 1_000_000))

    def rollout_pair(self) -> tuple[str, str, str] | None:
        """(model, baseline, candidate) the comparison's gauges are about: the rollout in progress, else the last promote."""
        try:
            state = json.loads(self.args.rollout_state.read_text()) if self.args.rollout_state else None
        except (OSError, ValueError):
            return None
        if not state:
            return None
        if state.get("candidate"):
            return state["model"], state["live"], state["candidate"]
        if state.get("previous"):
            return state["model"], state["previous"], state["live"]
        return None

    def rollout_lines(self) -> list[str]:
        pair = self.rollout_pair()
        if pair is None or self.store is None:
            return []
        counts = self.store.compare_counts(*pair)
        labels = f'ModelName="{pair[0]}",Baseline="{pair[1]}",Candidate="{pair[2]}"'
        lines = []
        for name, key, text in (
                ("rollout_compared_answers", "paired", "Answers both the baseline and the candidate gave to the same "
                 "requests (shadow or canary), in the store."),
                ("rollout_agreeing_answers", "agreeing", "Of those, the answers whose labels are the same.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} {counts[key]}"]
        for name, key, text in (("rollout_uncertain_answers", "uncertain", "uncertain"),
                                ("rollout_ood_answers", "ood", "out of distribution")):
            lines += [f"# HELP {name} Of the compared answers, those each side marked {text}.", f"# TYPE {name} gauge"]
            lines += [f'{name}{{{labels},Side="{side}"}} {counts[f"{key}_{part}"]}'
                      for side, part in (("baseline", "live"), ("candidate", "candidate"))]
        return lines

    def metrics(self) -> str:
        lines = []
        up = 0
        if self.store is not None:
            try:
                lines += self.store.metrics_lines()
                lines += self.rollout_lines()
                up = 1
            except Exception as exc:
                log.warning("store metrics unavailable: %s", exc)
        c = self.counters
        own = [("recorder_store_up", "gauge", "1 when the recorder read the feedback store for this scrape.", up),
               ("recorder_ingested_total", "counter", "Answers added to the store from the spool by this recorder process.",
                c["ingested"]),
               ("recorder_ingest_errors_total", "counter", "Failed ingestion passes or segments (retried next pass).",
                c["ingest_errors"]),
               ("recorder_bad_lines_total", "counter", "Spool lines that could not be read (torn by a killed worker).",
                c["bad_lines"] + (self.store.skipped if self.store is not None else 0)),
               ("recorder_pruned_total", "counter", "Unlabelled answers deleted by the retention.", c["pruned"]),
               ("recorder_spool_bytes", "gauge", "Bytes waiting in the spool.", self.spool_bytes())]
        for name, kind, help_text, value in own:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    def serve(self) -> socketserver.BaseServer:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, code: int, body, ctype: str = "application/json") -> None:
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                if code == 503:
                    self.send_header("Retry-After", "2")
                self.end_headers()
                self.wfile.write(payload)

            def _route(self, method: str) -> None:
                parts = urlsplit(self.path)
                path, query = unquote(parts.path), parse_qs(parts.query)
                body = b""
                if method == "POST":
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        self._send(413, {"code": 413, "type": "TooManyLabels",
                                         "message": f"The body is over {MAX_BODY} bytes; send the labels in smaller lists."})
                        return
                    body = self.rfile.read(length)
                try:
                    if path == "/metrics" and method == "GET":
                        self._send(200, recorder.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
                        return
                    if path == "/health" and method == "GET":
                        ok = recorder.store is not None
                        self._send(200 if ok else 503, {"store": "up" if ok else "down", "detail": recorder.store_error})
                        return
                    match = ROUTE.match(path)
                    if not match:
                        self._send(404, {"code": 404, "type": "NotFound", "message":
                                         "Feedback routes: POST /feedback/<model>, GET /feedback/<model>/summary, "
                                         "GET /feedback/<model>/review (and /export on the management port)."})
                        return
                    model, what = match.groups()
                    api = self.headers.get(API_HEADER, "")
                    if what is None and method == "POST":
                        self._send(200, recorder.label(model, body))
                    elif what == "summary" and method == "GET":
                        self._send(200, recorder.need_store().summary(model))
                    elif what == "review" and method == "GET":
                        self._send(200, recorder.review(model, query))
                    elif what in ("export", "compare") and method == "GET":
                        if api != "management":
                            self._send(403, {"code": 403, "type": "Forbidden", "message":
                                             f"/{what} is served on the management port, with the management key."})
                            return
                        self._send(200, recorder.export(model, query) if what == "export" else recorder.compare(model, query))
                    else:
                        self._send(405, {"code": 405, "type": "MethodNotAllowed", "message":
                                         f"Use POST /feedback/{model} to label, GET for /summary, /review and /export."})
                except FeedbackError as exc:
                    self._send(exc.status, exc.to_body())
                except Exception as exc:  # a bug, or the store failing mid-request: the client may retry
                    log.exception("feedback request failed")
                    self._send(503, {"code": 503, "type": "StoreUnavailable",
                                     "message": f"The feedback store failed on this request ({type(exc).__name__}); "
                                                "nothing was recorded: retry in a few seconds."})

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._route("GET")

            def do_POST(self):  # noqa: N802
                self._route("POST")

            def address_string(self):
                return "gateway"

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        sock = self.args.socket
        sock.unlink(missing_ok=True)
        server = Server(str(sock), Handler)
        os.chmod(sock, 0o600)
        return server


def _int(query: dict, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name, [None])[0]
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not low <= int(raw) <= high:
        raise MalformedFeedback(f"?{name}= must be an integer from {low} to {high}; got {raw[:20]!r}.")
    return int(raw)


def main(args: argparse.Namespace) -> int:
    if not args.store:
        print("error: no store: give --store (an SQLite file or postgresql://...) or set FEEDBACK_STORE", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s recorder %(levelname)s %(message)s")
    args.spool.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(args)
    server = recorder.serve()  # listening first: the gateway gets 503s that say why while the store comes up
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: recorder.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: recorder.stopping.set())
    log.info("listening on %s; spool %s; store %s", args.socket, args.spool, redact(args.store))
    recorder.connect()
    workers = [threading.Thread(target=recorder.run_ingest, name="ingest", daemon=True),
               threading.Thread(target=recorder.run_prune, name="prune", daemon=True)]
    for w in workers:
        w.start()
    while not recorder.stopping.wait(0.5):
        pass
    if recorder.store is not None:
        try:
            recorder.ingest_now()  # what the workers wrote last
        except Exception as exc:
            log.warning("last ingestion pass failed: %s", exc)
    server.shutdown()
    server.server_close()
    args.socket.unlink(missing_ok=True)
    if recorder.store is not None:
        recorder.store.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
