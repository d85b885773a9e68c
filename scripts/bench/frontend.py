"""Probes straight against one TorchServe frontend (no gateway): large uploads and log volume.

    python -m scripts.bench.frontend uploads -c 32 [--vmargs "-Xmx512m -XX:+ExitOnOutOfMemoryError"]
    python -m scripts.bench.frontend logs -n 2000 [--log-config <jar default: "">]

``uploads``: C threads post ``--size`` bytes of random data (octet-stream) for ``--seconds``
while the frontend's resident size is sampled every 0.1 s; prints whether it survived, its
peak size, the statuses, and the status of a normal prediction afterwards.
``logs``: ``hey -n N -c 8`` predictions; prints the bytes every file under logs/ (and the
frontend's standard output) grew per request. Each starts a private server with
scripts/deploy/harness.py (shipped config.properties; overrides with ``--vmargs``).
The figures in docs/hardening-torchserve.md come from these.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from scripts.deploy.harness import EXAMPLE, make_server
from scripts.ops.tsclient import wait_ready


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("uploads", "logs"))
    p.add_argument("--workdir", type=Path, default=None, help="server folder (default: a temporary one)")
    p.add_argument("--vmargs", default=None, help="replace config.properties' vmargs (e.g. the old -Xmx512m)")
    p.add_argument("-c", "--concurrency", type=int, default=32, help="uploads: concurrent uploaders")
    p.add_argument("--seconds", type=float, default=20.0, help="uploads: how long")
    p.add_argument("--size", type=int, default=9 * 2**20, help="uploads: bytes a body")
    p.add_argument("-n", "--requests", type=int, default=2000, help="logs: predictions to send")
    return p


def server(args, workdir: Path):
    overrides = {}
    if args.vmargs is not None:
        overrides["vmargs"] = f"{args.vmargs} -Djava.io.tmpdir={workdir / 'tmp'}"
    return make_server(workdir, overrides=overrides)


def uploads(args, workdir: Path) -> dict:
    srv = server(args, workdir)
    srv.start()
    try:
        proc = psutil.Process(srv.pid())
        key = srv.client.key("inference")
        url = f"{srv.client.endpoints.inference}/predictions/fashion_cnn"
        body, statuses = os.urandom(args.size), collections.Counter()
        peak, died, stop = [proc.memory_info().rss], [None], time.time() + args.seconds
        start = time.time()

        def sample():
            while time.time() < stop + 5:
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        raise psutil.NoSuchProcess(proc.pid)
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    died[0] = died[0] or time.time()
                    return
                time.sleep(0.1)

        def upload():
            session = requests.Session()
            while time.time() < stop and died[0] is None:
                try:
                    statuses[session.post(url, data=body, timeout=60, headers={
                        "Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}).status_code] += 1
                except requests.RequestException as exc:
                    statuses[type(exc).__name__] += 1

        threads = [threading.Thread(target=upload) for _ in range(args.concurrency)] + [threading.Thread(target=sample)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        after = None
        if alive:
            try:
                after = srv.client.predict("fashion_cnn", EXAMPLE.read_bytes(), check=False).status_code
            except requests.RequestException as exc:
                after = type(exc).__name__
        return {"concurrency": args.concurrency, "size": args.size, "alive": alive,
                "died_after_s": round(died[0] - start, 1) if died[0] else None,
                "peak_rss_mb": round(peak[0] / 2**20), "statuses": {str(k): v for k, v in statuses.items()},
                "prediction_after": after}
    finally:
        srv.stop()


def logs(args, workdir: Path) -> dict:
    srv = server(args, workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    with open(workdir / "stdout.log", "wb") as out:
        srv.launch(stdout=out)
    try:
        wait_ready(srv.client, "fashion_cnn", EXAMPLE.read_bytes(), deadline_s=240)
        time.sleep(3)

        def sizes():
            files = [p for p in (workdir / "logs").rglob("*") if p.is_file()] + [workdir / "stdout.log"]
            return {str(p.relative_to(workdir)): p.stat().st_size for p in files}

        before = sizes()
        url = f"{srv.client.endpoints.inference}/predictions/fashion_cnn"
        subprocess.run(["hey", "-n", str(args.requests), "-c", "8", "-m", "POST", "-T", "image/png", "-D", str(EXAMPLE),
                        "-H", f"Authorization: Bearer {srv.client.key('inference')}", url],
                       check=True, capture_output=True, timeout=900)
        time.sleep(3)
        growth = {k: v - before.get(k, 0) for k, v in sizes().items() if v - before.get(k, 0)}
        total = sum(growth.values())
        return {"requests": args.requests, "bytes_total": total, "bytes_per_request": round(total / args.requests, 1),
                "per_file": growth}
    finally:
        srv.stop()


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"frontend-{args.probe}-") as tmp:
        workdir = args.workdir or Path(tmp)
        report = (uploads if args.probe == "uploads" else logs)(args, workdir)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
