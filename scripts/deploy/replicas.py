"""One TorchServe replica behind the gateway: its own folder, ports, TMPDIR and worker ports.

Two TorchServes on one host collide on ``$TMPDIR/.model_server.pid`` and on worker
ports 9000+, so replica ``i`` runs from ``<run>/replica-i`` with ``TMPDIR`` (and the
JVM's ``java.io.tmpdir``, where worker sockets live) inside it, free loopback ports
for its REST and gRPC APIs, and worker ports from ``9000 + 1000 * (i + 1)``. Its
config is the shipped config.properties with only those lines rewritten
(scripts/deploy/harness.py:write_config). Token auth stays on; its keys (in its
folder, owner-only) are read by the gateway, which is the only client that holds them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil

from scripts.deploy.gateway import ReplicaRoute
from scripts.deploy.harness import EXAMPLE, Server, write_config
from scripts.ops.tsclient import TorchServeClient, wait_ready

# The gateway's copies of the replicas' keys are rewritten when a replica restarts, so replica
# keys need not expire while it runs (TorchServe's default, 60 min, would lock the gateway out).
KEY_LIFETIME_MIN = 60 * 24 * 365


class Replica:
    def __init__(self, index: int, run_dir: Path, model_store: Path, overrides: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, generation: int = 0):
        self.index = index
        # A replica replaced while it serves (a version staged beside the others: scripts/deploy/traffic.py) runs
        # beside its successor for a while: each generation has its own folder and worker ports.
        self.generation = generation
        self.workdir = run_dir / (f"replica-{index}" if generation == 0 else f"replica-{index}-g{generation}")
        self.model_store = model_store
        self.overrides = overrides or {}
        self.env = env or {}  # for its workers: where they spool answers (handler/record.py)
        self.server: Server | None = None
        self.lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------
    def configure(self) -> Server:
        """A fresh config (new free ports) in the replica's folder."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        overrides = {
            "token_expiration_min": str(KEY_LIFETIME_MIN),
            "initial_worker_port": str(9000 + 1000 * (self.index + 1) + 500 * (self.generation % 2)),
            "initial_distribution_port": str(29500 + 100 * (self.index + 1) + 50 * (self.generation % 2)),
            **self.overrides,
        }
        config = write_config(self.workdir, self.model_store, overrides)
        self.server = Server(self.workdir, config, self.model_store, TorchServeClient.from_config(config, self.workdir),
                             dict(self.env))
        return self.server

    def launch(self) -> None:
        """``torchserve --start`` (returns once the frontend is forked; models load after)."""
        server = self.configure()
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        log = self.workdir / "logs"
        log.mkdir(exist_ok=True)
        with open(log / "torchserve_start.log", "ab") as out:
            server.launch(stdout=out)

    def wait_ready(self, model: str, deadline_s: float = 240.0, cancelled=lambda: False) -> dict:
        """Until the replica answers a real prediction; fails early when it died or ``cancelled()`` (a stop)."""
        def going() -> bool:
            if cancelled():
                raise RuntimeError(f"replica {self.index}: stopped while it was starting")
            return self.alive()

        return wait_ready(self.client, model, EXAMPLE.read_bytes(), deadline_s=deadline_s, alive=going)

    def stop(self, timeout: float = 60.0) -> None:
        """``torchserve --stop``, then wait until the frontend and its workers are gone."""
        pid = self.pid()
        if self.server is None or pid is None:
            return
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        self.server.stop()
        psutil.wait_procs(procs, timeout=timeout)

    # --- state ----------------------------------------------------------------------------------
    @property
    def client(self) -> TorchServeClient:
        assert self.server is not None, "configure() first"
        return self.server.client

    def pid(self) -> int | None:
        return self.server.pid() if self.server is not None else None

    def alive(self) -> bool:
        return self.pid() is not None

    def keys(self) -> dict:
        return json.loads((self.workdir / "key_file.json").read_text())

    def route(self) -> ReplicaRoute:
        keys, ep = self.keys(), self.client.endpoints
        return ReplicaRoute(self.index, ep.inference, ep.management, ep.metrics,
                            keys["inference"]["key"], keys["management"]["key"])

    def describe(self) -> dict:
        ep = self.client.endpoints if self.server else None
        return {"index": self.index, "pid": self.pid(), "workdir": str(self.workdir),
                "inference": ep.inference if ep else None, "management": ep.management if ep else None,
                "metrics": ep.metrics if ep else None}
