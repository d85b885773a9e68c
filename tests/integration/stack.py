"""Start the real serving stack (nginx gateway + TorchServe replicas + supervisor) the way users do.

``python -m scripts.deploy.serve start`` with free public ports, a private run folder,
log folder and key file, and a model store of its own (the shipped archive packaged by
scripts.deploy.package, as on a fresh clone where `make mar` has not run); stopped with
``serve stop`` in every case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from scripts.deploy.harness import REPO, build_store, free_ports, write_config
from scripts.ops.tsclient import Endpoints, TorchServeClient


@dataclass
class Stack:
    root: Path
    ports: list[int]
    replicas: int

    @property
    def args(self) -> list[str]:
        config = self.root / "config.properties"
        if not config.exists():  # the shipped config with an own model store (paths and limits as shipped)
            write_config(self.root, build_store(self.root / "model_store"))
        return ["--config", str(config), "--ports", ",".join(map(str, self.ports)), "--run-dir", str(self.run_dir),
                "--log-dir", str(self.log_dir), "--key-file", str(self.key_file)]

    run_dir = property(lambda self: self.root / "run")
    log_dir = property(lambda self: self.root / "logs")
    key_file = property(lambda self: self.root / "key_file.json")
    inference = property(lambda self: f"http://127.0.0.1:{self.ports[0]}")
    management = property(lambda self: f"http://127.0.0.1:{self.ports[1]}")
    metrics = property(lambda self: f"http://127.0.0.1:{self.ports[2]}")
    grpc = property(lambda self: f"127.0.0.1:{self.ports[3]}")  # KServe's gRPC service (host:port, as gRPC clients take it)

    def serve(self, action: str, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scripts.deploy.serve", action, *self.args, *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def key(self, kind: str = "inference") -> str:
        return json.loads(self.key_file.read_text())[kind]["key"]

    def client(self, timeout: float = 60) -> TorchServeClient:
        return TorchServeClient(Endpoints(self.inference, self.management, self.metrics), self.key_file, timeout=timeout)

    def state(self) -> dict:
        return json.loads((self.run_dir / "state.json").read_text())

    def replica_state(self) -> list[dict]:
        return self.state()["replicas"]

    def ping(self) -> requests.Response:
        return requests.get(f"{self.inference}/ping", timeout=10)

    def access_log(self) -> list[dict]:
        path = self.log_dir / "gateway_access.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@contextmanager
def running_stack(root: Path, replicas: int = 1):
    stack = Stack(root, free_ports(4), replicas)
    started = stack.serve("start", "--replicas", str(replicas))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield stack
    finally:
        stopped = stack.serve("stop", timeout=200)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
