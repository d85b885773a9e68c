"""Abuse probes against a running gateway (loopback only): do real requests still get through?

    python -m scripts.bench.abuse idle  --connections 18000     # connections that never send a request
    python -m scripts.bench.abuse flood --clients 16 --mb 9      # unauthenticated large uploads in a loop

Each probe times authenticated predictions (coat.png) before and during the abuse and
prints the median and worst latency and every status seen. The figures in
docs/security.md come from these commands against ``make serve``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

from scripts.ops.tsclient import REPO, read_properties

COAT = REPO / "examples" / "coat.png"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("idle", "flood"))
    p.add_argument("--url", default=None, help="inference base URL (default: config.properties' inference_address)")
    p.add_argument("--key-file", type=Path, default=REPO / "key_file.json")
    p.add_argument("--connections", type=int, default=18000, help="idle: connections to hold (split over processes)")
    p.add_argument("--processes", type=int, default=2, help="idle: processes holding them (fd limit per process)")
    p.add_argument("--clients", type=int, default=16, help="flood: concurrent unauthenticated uploaders")
    p.add_argument("--mb", type=float, default=9.0, help="flood: body size")
    p.add_argument("--seconds", type=float, default=8.0, help="how long the abuse lasts while we measure")
    p.add_argument("--samples", type=int, default=20, help="authenticated predictions timed per phase")
    return p


def timed_predictions(url: str, key: str, n: int) -> dict:
    latencies, statuses = [], {}
    session = requests.Session()
    for _ in range(n):
        start = time.perf_counter()
        try:
            status = session.post(f"{url}/predictions/fashion_cnn", data=COAT.read_bytes(),
                                  headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        latencies.append((time.perf_counter() - start) * 1000)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"median_ms": round(statistics.median(latencies), 1), "max_ms": round(max(latencies), 1), "status": statuses}


def _hold(port: int, n: int, seconds: float, opened) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError:
            break
    opened.put(len(socks))
    time.sleep(seconds)
    for s in socks:
        s.close()


def idle(args, url: str, key: str) -> dict:
    port = int(url.rsplit(":", 1)[1])
    opened: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_hold, args=(port, args.connections // args.processes, args.seconds + 30, opened))
             for _ in range(args.processes)]
    for p in procs:
        p.start()
    held = sum(opened.get(timeout=120) for _ in procs)
    during = timed_predictions(url, key, args.samples)
    for p in procs:
        p.terminate()
        p.join()
    return {"idle_connections_held": held, "during": during}


def flood(args, url: str, key: str) -> dict:
    body = b"\0" * int(args.mb * 2**20)
    stop, statuses, lock = threading.Event(), {}, threading.Lock()

    def uploader():
        session = requests.Session()
        while not stop.is_set():
            try:
                status = session.post(f"{url}/predictions/fashion_cnn", data=body,
                                      headers={"Content-Type": "application/octet-stream"}, timeout=60).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1

    threads = [threading.Thread(target=uploader, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(1)
    during = timed_predictions(url, key, args.samples)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {"flood_statuses": statuses, "during": during}


def main(args: argparse.Namespace) -> dict:
    url = (args.url or read_properties(REPO / "config.properties")["inference_address"]).rstrip("/")
    if not url.startswith("http://127.0.0.1:"):
        sys.exit(f"refusing to probe anything but loopback: {url}")
    key = json.loads(args.key_file.read_text())["inference"]["key"]
    report = {"probe": args.probe, "url": url, "before": timed_predictions(url, key, args.samples)}
    report.update((idle if args.probe == "idle" else flood)(args, url, key))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
