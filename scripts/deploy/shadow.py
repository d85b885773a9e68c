"""The shadow sink: takes the predictions the hops mirror during a shadow rollout and sends them to the candidate.

    python -m scripts.deploy.shadow --socket run/shadow.sock --run-dir run

A child of the supervisor (scripts/deploy/supervisor.py), restarted when it dies. While a shadow rollout is on,
every replica's hop mirrors each default prediction of the model here (nginx ``mirror``,
scripts/deploy/gateway.py). The sink reads the copy, answers 204 at once (so the mirror subrequest ends in a
millisecond and never holds the client's request or the gateway's keep-alive connection), and queues it; ``--senders``
threads send each queued copy to the candidate's versioned URL (``/predictions/<model>/<version>``) through the
same replica's hop, with the client's request id, options and body. The candidate's worker records its answer in
the spool beside the live one's (handler/record.py), under the same request id: that is the comparison's data
(``ctl compare``).

The queue is bounded (``--queue``): a candidate that is slow, frozen or gone makes the sink drop copies (counted),
never the clients wait. Each copy has ``--timeout`` seconds. ``GET /metrics``: ``shadow_requests_total`` by
outcome (answered, rejected: a 4xx, failed: 5xx or no answer, dropped: queue full) and ``shadow_latency_seconds``
(the candidate's answer time through the hop), per model and candidate version.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import logging
import os
import queue
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("shadow")
ROUTE = re.compile(r"^/shadow/([A-Za-z0-9._-]+)/([A-Za-z0-9._-]+)$")
MAX_BODY = 16 * 2**20
# The client's request headers that travel with the copy (its options and how its body is to be read).
FORWARDED = ("content-type", "x-request-id", "x-tta", "x-top-k", "x-inference-protocol", "inference-header-content-length")
OUTCOMES = ("answered", "rejected", "failed", "dropped")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", type=Path, required=True, help="Unix socket the hops mirror to")
    p.add_argument("--run-dir", type=Path, required=True, help="the stack's run folder (the hops' sockets)")
    p.add_argument("--queue", type=int, default=256, help="copies waiting at most; more are dropped and counted")
    p.add_argument("--senders", type=int, default=4, help="copies in flight to the candidate at once")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a copy may take before it counts as failed")
    return p


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("shadow", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Sink:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, args.queue))
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (model, version, outcome) -> copies
        self.latency: dict[tuple[str, str], list[float]] = {}  # (model, version) -> [bucket counts..., sum, count]
        self.stopping = threading.Event()

    def hop(self, replica: str) -> Path:
        return self.args.run_dir / f"replica-{int(replica)}.sock"

    def offer(self, model: str, version: str, replica: str, headers: dict, body: bytes) -> None:
        try:
            self.queue.put_nowait((model, version, replica, headers, body))
        except queue.Full:
            self.count(model, version, "dropped")

    def count(self, model: str, version: str, outcome: str, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[(model, version, outcome)] += 1
            if seconds is not None:
                hist = self.latency.setdefault((model, version), [0.0] * (len(BUCKETS) + 2))
                for i, bound in enumerate(BUCKETS):
                    if seconds <= bound:
                        hist[i] += 1
                hist[-2] += seconds
                hist[-1] += 1

    def send(self) -> None:
        connections: dict[str, UnixConnection] = {}
        while not self.stopping.is_set():
            try:
                model, version, replica, headers, body = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            started = time.monotonic()
            outcome = "failed"
            for attempt in (0, 1):  # a kept-alive connection the hop closed (a reload) is opened once more
                conn = connections.get(replica) or UnixConnection(self.hop(replica), self.args.timeout)
                connections[replica] = conn
                try:
                    conn.request("POST", f"/predictions/{model}/{version}", body=body,
                                 headers={**headers, "Content-Length": str(len(body))})
                    resp = conn.getresponse()
                    resp.read()
                    outcome = "answered" if resp.status < 400 else "rejected" if resp.status < 500 else "failed"
                    if resp.will_close:
                        conn.close()
                        connections.pop(replica, None)
                    break
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    connections.pop(replica, None)
                    if attempt or isinstance(exc, TimeoutError) or time.monotonic() - started > self.args.timeout:
                        log.debug("copy to %s %s failed: %s", model, version, exc)
                        break
            self.count(model, version, outcome, time.monotonic() - started if outcome != "failed" else None)

    def metrics(self) -> str:
        with self.lock:
            outcomes, latency = dict(self.outcomes), {k: list(v) for k, v in self.latency.items()}
        keys = sorted({(m, v) for m, v, _ in outcomes} | set(latency))
        lines = ["# HELP shadow_requests_total Predictions mirrored to a shadow candidate, by outcome (answered, rejected: "
                 "4xx, failed: 5xx or no answer in time, dropped: the sink's queue was full).",
                 "# TYPE shadow_requests_total counter"]
        for model, version in keys:
            for outcome in OUTCOMES:
                lines.append(f'shadow_requests_total{{ModelName="{model}",ModelVersion="{version}",outcome="{outcome}"}} '
                             f"{outcomes.get((model, version, outcome), 0)}")
        lines += ["# HELP shadow_latency_seconds The candidate's answer time to a mirrored prediction (through the hop).",
                  "# TYPE shadow_latency_seconds histogram"]
        for (model, version), hist in sorted(latency.items()):
            labels = f'ModelName="{model}",ModelVersion="{version}"'
            for bound, n in zip(BUCKETS, hist):
                lines.append(f'shadow_latency_seconds_bucket{{{labels},le="{bound:g}"}} {n:g}')
            lines.append(f'shadow_latency_seconds_bucket{{{labels},le="+Inf"}} {hist[-1]:g}')
            lines.append(f"shadow_latency_seconds_sum{{{labels}}} {hist[-2]:.6f}")
            lines.append(f"shadow_latency_seconds_count{{{labels}}} {hist[-1]:g}")
        lines += ["# HELP shadow_queue_depth Mirrored predictions waiting to be sent to the candidate.",
                  "# TYPE shadow_queue_depth gauge", f"shadow_queue_depth {self.queue.qsize()}"]
        return "\n".join(lines) + "\n"

    def serve(self) -> socketserver.BaseServer:
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the hops keep their connections to the sink alive

            def _answer(self, code: int, payload: bytes = b"", ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if payload:
                    self.wfile.write(payload)

            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self.close_connection = True
                    self._answer(413)
                    return
                body = self.rfile.read(length)
                match = ROUTE.match(self.path)
                self._answer(204 if match else 404)  # first: the mirror subrequest ends here
                if match:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
                    sink.offer(*match.groups(), self.headers.get("X-Shadow-Replica", "0"), headers, body)

            def do_GET(self):  # noqa: N802
                if self.path == "/metrics":
                    self._answer(200, sink.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    self._answer(404)

            def address_string(self):
                return "hop"

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.args.socket.unlink(missing_ok=True)
        server = Server(str(self.args.socket), Handler)
        os.chmod(self.args.socket, 0o600)
        return server


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s shadow %(levelname)s %(message)s")
    sink = Sink(args)
    server = sink.serve()
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    for i in range(max(1, args.senders)):
        threading.Thread(target=sink.send, name=f"sender-{i}", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sink.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: sink.stopping.set())
    log.info("listening on %s; queue %d, %d senders, timeout %.1f s", args.socket, args.queue, args.senders, args.timeout)
    while not sink.stopping.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    args.socket.unlink(missing_ok=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
