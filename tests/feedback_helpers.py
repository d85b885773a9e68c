"""Shared by the feedback tests: spool lines as handler/record.py writes them, a recorder process, a PostgreSQL cluster.

``postgres()`` starts a private PostgreSQL (Debian's package) in a temporary folder with ``initdb`` and ``pg_ctl`` as
an unprivileged user (``postgres``, or ``nobody``, when the tests run as root), listening on a Unix socket only,
and stops it by its own pid file in every case.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests

from handler import record
from scripts.train.data import FASHION_MNIST_CLASSES

REPO = Path(__file__).resolve().parent.parent
CLASSES = list(FASHION_MNIST_CLASSES)


def model_line(model: str = "fashion_cnn", version: str = "1.0", classes=None) -> dict:
    return {"v": 1, "type": "model", "time": time.time(), "model": model, "version": version,
            "classes": list(classes or CLASSES)}


def answer_line(request_id: str, label: str = "Coat", *, item: int = 0, model: str = "fashion_cnn", version: str = "1.0",
                confidence: float = 0.95, uncertain: bool = False, ood: bool = False, review: bool | None = None,
                when: float | None = None, seed: int = 0, upload: bytes | None = None) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    import base64

    return {"v": 1, "type": "answer", "time": time.time() if when is None else when, "model": model,
            "version": version, "request_id": request_id, "item": item, "label": label,
            "class_index": CLASSES.index(label), "confidence": confidence, "uncertain": uncertain, "ood": ood,
            "ood_score": 0.5, "tta_views": 1,
            "review": record.in_review_sample(request_id, item, uncertain, ood, 0.05) if review is None else review,
            "input": record.encode_input(image), "upload": base64.b64encode(upload).decode() if upload else None}


def write_spool(folder: Path, lines: list[dict], header: dict | None = None) -> record.Spool:
    """Lines through the handler's own Spool writer (a segment of this process)."""
    spool = record.Spool(folder, 2**30, (json.dumps(header or model_line()) + "\n").encode())
    spool.append(("\n".join(json.dumps(line) for line in lines) + "\n").encode())
    return spool


# --- PostgreSQL ---------------------------------------------------------------------------------------------------
def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    return None


def postgres_missing() -> str | None:
    missing = [n for n in ("initdb", "pg_ctl", "postgres") if pg_bin(n) is None]
    if missing:
        return (f"PostgreSQL is not installed ({', '.join(missing)} not found): apt-get install postgresql "
                "(scripts/setup_env.sh installs it)")
    return None


def _account() -> tuple[int, int] | None:
    """The unprivileged account PostgreSQL runs as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    raise RuntimeError("running as root and no postgres or nobody account to run PostgreSQL as")


@contextmanager
def postgres(database: str = "feedback"):
    """A private PostgreSQL cluster; yields the DSN of a fresh database on its Unix socket."""
    account = _account()
    root = Path(tempfile.mkdtemp(prefix="pg-feedback-"))
    data, log = root / "data", root / "server.log"

    def run(*cmd, check=True, **kw):
        kwargs = {"user": account[0], "group": account[1], "extra_groups": []} if account else {}
        return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, timeout=120,
                              **kwargs, **kw)

    if account:
        os.chown(root, *account)
    started = False
    try:
        run(pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        opts = f"-k {root} -c listen_addresses='' -c fsync=on -c max_connections=40"
        run(pg_bin("pg_ctl"), "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start")
        started = True
        dsn_admin = f"postgresql://postgres@/postgres?host={root}"
        import psycopg

        with psycopg.connect(dsn_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield f"postgresql://postgres@/{database}?host={root}"
    finally:
        if started:
            run(pg_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


# --- a recorder process ---------------------------------------------------------------------------------------------
class RecorderProcess:
    """``python -m scripts.deploy.recorder`` as the supervisor starts it, on a socket in ``root``."""

    def __init__(self, root: Path, store: str, spool: Path | None = None, *extra: str):
        self.root, self.store = root, store
        self.spool = spool or root / "spool"
        self.socket = root / "feedback.sock"
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = root / "recorder.log"

    def start(self, timeout: float = 60) -> RecorderProcess:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.deploy.recorder", "--spool", str(self.spool),
                                      "--socket", str(self.socket), "--store", self.store, "--interval", "0.2",
                                      *self.extra], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if self.get("/health").status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the recorder did not come up: {self.log.read_text()[-3000:]}")

    def request(self, method: str, path: str, **kw) -> requests.Response:
        return unix_request(self.socket, method, path, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, doc, **kw) -> requests.Response:
        return self.request("POST", path, data=json.dumps(doc).encode(), **kw)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # kill -9, this process only
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class _Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status_code, self.headers, self.content = status, headers, body

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def unix_request(sock: Path, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
                 timeout: float = 30) -> _Response:
    """One HTTP request over a Unix socket (what nginx does when it proxies to the recorder)."""
    import http.client
    import socket as socketlib

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(sock))

    conn = Conn("localhost", timeout=timeout)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return _Response(resp.status, dict(resp.getheaders()), resp.read())
    except (OSError, http.client.HTTPException) as exc:
        raise requests.ConnectionError(str(exc)) from exc
    finally:
        conn.close()
