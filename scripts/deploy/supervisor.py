"""The serving stack: N TorchServe replicas, the nginx gateway in front, and a supervisor that keeps them up.

    client -> gateway (nginx: credential, limits, retries) -> replica i's hop (nginx: its keys) -> TorchServe i -> workers

The supervisor (one thread of ``python -m scripts.deploy.serve run``)

- restarts a replica whose frontend died, and the gateway if nginx died; each restart is
  logged (logs/supervisor.log) and counted (``gateway_replica_restarts_total``);
- probes every replica with a real prediction every PROBE_INTERVAL_S seconds, so readiness
  (the gateway's ``/ping``, ``make status``) says whether a prediction can be served *now*: a
  replica with 0 workers, or whose only worker is frozen, is not ready, whatever TorchServe's
  own ``/ping`` says; replicas that are not ready are taken out of the gateway's rotation
  while another one is ready (their hop answers 503 at once, which the gateway retries on
  another replica);
- renders and reloads a replica's hop when it restarts (new ports, new keys) or its readiness
  changes; the gateway itself is rendered once and never reloaded while it serves, so the
  clients' keep-alive connections survive every replica event;
- serves, on a Unix socket only nginx reaches, ``/ready`` and ``/metrics``: every replica's
  TorchServe metrics with a ``replica`` label, plus its own (restarts, readiness, the worker
  cap, and ``gateway_http_responses_total`` by API and status, counted from the access log);
  and the Open Inference Protocol's server metadata (``/v2``) and model readiness
  (``/v2/models/<m>[/versions/<v>]/ready``: 200, 503, or 404 for what no replica serves);
- runs KServe's gRPC service (scripts/deploy/grpc_service.py) behind the gateway's public gRPC
  port, and restarts it when it dies;
- runs the recorder (scripts/deploy/recorder.py): every replica's workers append each answer to
  their spool (run/spool/replica-<i>/, handler/record.py), the recorder ingests it into the feedback
  store and serves ``/feedback`` behind the gateway; restarted when it dies, its metrics merged;
- owns the gradual rollout (scripts/deploy/traffic.py: ``/rollout/<model>`` behind the management port): a
  version staged beside the live one on every replica, shadow and canary rendered into every hop, promote and
  rollback; and runs the shadow sink (scripts/deploy/shadow.py) the hops mirror to, restarted when it dies.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import logging
import logging.handlers
import os
import re
import socketserver
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from handler.record import RECORD_ENV
from handler.request import PROBE_HEADER
from scripts.deploy.gateway import (
    FEEDBACK_SOCKET,
    GRPC_SOCKET,
    SHADOW_SOCKET,
    Gateway,
    GatewaySettings,
    Hop,
    HopSettings,
    Nginx,
    ReplicaRoute,
    service_keys,
    write_private,
)
from scripts.deploy.harness import EXAMPLE, REPO
from scripts.deploy.replicas import Replica
from scripts.deploy.traffic import RolloutError, Rollouts, state_file
from scripts.ops import capacity as capacity_mod
from scripts.ops.tsclient import TorchServeClient, read_properties

PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 5.0
FAILURES_BEFORE_UNREADY = 2
STALE_AFTER_S = 15.0  # a probe older than this does not count as ready
ACCESS_LOG_MAX_BYTES = 50 * 2**20  # ~330 B a request: ~160,000 requests a file
ACCESS_LOG_KEEP = 3  # rotated files kept: the access log takes at most (1 + 3) x 50 MiB

log = logging.getLogger("supervisor")
# GET /v2: what the Open Inference Protocol calls server metadata; the extensions are those handler/v2.py serves.
V2_EXTENSIONS = ["binary_tensor_data", "parameters"]
V2_MODEL_READY = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/ready$")
ROLLOUT_ROUTE = re.compile(r"^/rollout/([A-Za-z0-9._-]+)(/stage)?$")


@dataclass
class StackOptions:
    run_dir: Path
    log_dir: Path
    key_file: Path
    model_store: Path
    model: str = "fashion_cnn"
    replicas: int = 1
    public_inference: str = "127.0.0.1:8080"
    public_management: str = "127.0.0.1:8081"
    public_metrics: str = "127.0.0.1:8082"
    public_grpc: str | None = None  # KServe's gRPC service on this host:port; None: not served
    max_body: int = 10 * 2**20
    large_bodies: int = 4
    photo_bodies: int = 16
    access_log: str = "file"  # or "stdout"
    ready_timeout_s: float = 240.0
    replica_overrides: dict[str, str] = field(default_factory=dict)
    record: bool = True  # every answer recorded, /feedback served (the recorder); False: neither
    store: str | None = None  # a PostgreSQL DSN, or an SQLite file; None: <run>/feedback.sqlite3
    keep_uploads: bool = False  # keep the raw upload of the answers in the review sample
    review_share: float = 0.05  # share of confident answers drawn into the review sample
    spool_mb: float = 256.0  # per replica: answers waiting for the recorder, at most (then dropped and counted)
    retention_days: float = 30.0  # unlabelled answers older than this are deleted
    retention_mb: float = 1024.0  # the recorded inputs and uploads are kept under this size

    def store_location(self) -> str:
        return self.store or str(self.run_dir / "feedback.sqlite3")


@dataclass
class Health:
    ready: bool = False
    failures: int = 0
    checked_at: float = 0.0
    detail: str = "not probed yet"
    restarts: int = 0
    restarting: bool = False

    def to_json(self, now: float) -> dict:
        return {"ready": self.is_ready(now), "detail": self.detail, "restarts": self.restarts,
                "probe_age_s": round(now - self.checked_at, 1) if self.checked_at else None}

    def is_ready(self, now: float) -> bool:
        return self.ready and not self.restarting and now - self.checked_at < STALE_AFTER_S


class GrpcService:
    """scripts/deploy/grpc_service.py, a child of the supervisor on run/grpc.sock (the gateway's gRPC port proxies to it)."""

    name = "the gRPC service"

    def __init__(self, run_dir: Path, log_dir: Path, upstream: str, max_message: int):
        self.socket = run_dir / GRPC_SOCKET
        self.log = log_dir / "grpc_service.log"
        self.command = [sys.executable, "-m", "scripts.deploy.grpc_service", "--socket", str(self.socket),
                        "--upstream", upstream, "--max-message", str(max_message + 2**16)]
        self.proc: subprocess.Popen | None = None
        self.env: dict | None = None

    def start(self, timeout: float = 30.0) -> int:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            if self.socket.exists():
                return self.proc.pid
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {self.socket} within {timeout:.0f} s; see {self.log}")

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid() is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class RecorderService(GrpcService):
    """scripts/deploy/recorder.py, a child of the supervisor on run/feedback.sock (the gateway's /feedback proxies to it)."""

    name = "the recorder"

    def __init__(self, opts: StackOptions):
        self.socket = opts.run_dir / FEEDBACK_SOCKET
        self.log = opts.log_dir / "recorder.log"
        self.command = [sys.executable, "-m", "scripts.deploy.recorder", "--spool", str(opts.run_dir / "spool"),
                        "--socket", str(self.socket), "--rollout-state", str(state_file(opts.run_dir)),
                        "--retention-days", str(opts.retention_days), "--retention-mb", str(opts.retention_mb)]
        self.env = {**os.environ, "FEEDBACK_STORE": opts.store_location()}  # a DSN's password stays out of `ps`
        self.proc = None

    def metrics(self) -> str:
        """Its /metrics text, or "" when it does not answer."""
        import http.client
        import socket as socketlib

        conn = http.client.HTTPConnection("recorder", timeout=5)
        try:
            conn.sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            conn.sock.settimeout(5)
            conn.sock.connect(str(self.socket))
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            return resp.read().decode() if resp.status == 200 else ""
        except (OSError, http.client.HTTPException):
            return ""
        finally:
            conn.close()


class ShadowSink(RecorderService):
    """scripts/deploy/shadow.py, a child of the supervisor on run/shadow.sock (the hops mirror to it in a shadow rollout)."""

    name = "the shadow sink"

    def __init__(self, opts: StackOptions):
        self.socket = opts.run_dir / SHADOW_SOCKET
        self.log = opts.log_dir / "shadow.log"
        self.command = [sys.executable, "-m", "scripts.deploy.shadow", "--socket", str(self.socket),
                        "--run-dir", str(opts.run_dir)]
        self.env, self.proc = None, None


def record_settings(opts: StackOptions, index: int) -> Path:
    """run/record-<i>.json: where replica i's workers spool their answers (handler/record.py reads it)."""
    path = opts.run_dir / f"record-{index}.json"
    write_private(path, json.dumps({"spool": str(opts.run_dir / "spool" / f"replica-{index}"),
                                    "max_spool_bytes": int(opts.spool_mb * 2**20), "review_share": opts.review_share,
                                    "keep_uploads": opts.keep_uploads}, indent=2))
    return path


class Stack:
    def __init__(self, opts: StackOptions):
        self.opts = opts
        env = (lambda i: {RECORD_ENV: str(opts.run_dir / f"record-{i}.json")}) if opts.record else (lambda i: {})
        self.replicas = [Replica(i, opts.run_dir, opts.model_store, opts.replica_overrides, env(i))
                         for i in range(opts.replicas)]
        self.health = {r.index: Health() for r in self.replicas}
        self.gateway: Gateway | None = None
        self.grpc: GrpcService | None = None
        self.grpc_restarts = 0
        self.recorder: RecorderService | None = None
        self.recorder_restarts = 0
        self.rollouts = Rollouts(self)
        self.shadow: ShadowSink | None = None
        self.shadow_restarts = 0
        self.models: dict[int, dict[str, dict[str, bool]]] = {}  # replica -> model -> version -> a worker is READY
        self.hops: dict[int, Hop] = {}
        self.capacity: capacity_mod.Capacity | None = None
        self.keys: dict = {}
        self.gateway_restarts = 0
        self.started_at = time.time()
        self.render_lock = threading.Lock()
        self.status_server: socketserver.BaseServer | None = None
        self.stopping = threading.Event()
        self._probe_clients: dict[int, TorchServeClient] = {}
        self._routes: dict[int, ReplicaRoute] = {}  # replica index -> its last known route
        # (api, status) -> answers the gateway gave clients; the usual codes start at 0 so that Prometheus sees a
        # first burst as an increase (increase() cannot count a series' first sample)
        self.responses: dict[tuple[str, str], int] = {
            ("inference", str(code)): 0 for code in (200, 400, 401, 404, 413, 415, 429, 500, 502, 503, 504)}
        self._log_position: tuple[int, int] | None = None  # (inode, offset) read so far in the access log
        self._apis: dict[str, str] = {}

    # --- start / stop -------------------------------------------------------------------------
    def start(self) -> None:
        opts = self.opts
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        if opts.run_dir.stat().st_uid == os.getuid():  # not a mount point owned by someone else (an emptyDir)
            opts.run_dir.chmod(0o700)
        setup_logging(opts.log_dir)
        self.keys = service_keys(opts.key_file)  # a bad key file fails here, before anything starts
        if opts.record:  # the recorder first: the workers' first answers are read as soon as they are spooled
            for r in self.replicas:
                record_settings(opts, r.index)
            self.recorder = RecorderService(opts)
            self.recorder.start()
        log.info("starting %d replica(s) of %s", len(self.replicas), opts.model)
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.launch(), self.replicas))
            list(pool.map(lambda r: r.wait_ready(opts.model, opts.ready_timeout_s, self.stopping.is_set), self.replicas))
        if self.stopping.is_set():  # asked to stop while the last answer was on its way
            raise RuntimeError("stopped while starting")
        for r in self.replicas:
            self.health[r.index] = Health(ready=True, checked_at=time.monotonic(), detail="answered at start")
            self.refresh_models(r)
        self.rollouts.start()
        self.shadow = ShadowSink(opts)
        self.shadow.start()
        vmargs = read_properties(self.replicas[0].server.config).get("vmargs", "")
        self.capacity = capacity_mod.measure([r.pid() for r in self.replicas], vmargs)
        log.info("worker cap: %d per replica (%s)", self.capacity.cap, json.dumps(self.capacity.to_json()))
        self.start_status_server()
        self._apis = {addr.rsplit(":", 1)[1]: api for api, addr in (
            ("inference", opts.public_inference), ("management", opts.public_management), ("metrics", opts.public_metrics),
            ("grpc", opts.public_grpc or ":")) if addr != ":"}
        for r in self.replicas:
            hop = self.hops[r.index] = Hop(self.hop_settings(r, ready={h.index for h in self.replicas}))
            hop.write()
            hop.start()
        if opts.public_grpc:  # listening before the gateway sends it anything
            host, port = opts.public_inference.rsplit(":", 1)
            upstream = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
            self.grpc = GrpcService(opts.run_dir, opts.log_dir, upstream, opts.max_body)
            self.grpc.start()
        self.gateway = Gateway(self.settings(), self.keys)
        self.gateway.write()
        self.publish()  # GET /replicas must answer from the first request on
        self.gateway.start()
        self.publish()  # now with the gateway's pids
        log.info("gateway up: inference %s, management %s, metrics %s",
                 opts.public_inference, opts.public_management, opts.public_metrics)

    def request_stop(self, why: str) -> None:
        log.info("%s: stopping", why)
        self.stopping.set()

    def stop(self) -> None:
        self.stopping.set()
        if self.gateway is not None:
            self.gateway.stop()
        if self.grpc is not None:
            self.grpc.stop()
        for hop in self.hops.values():
            hop.stop()
        if self.shadow is not None:
            self.shadow.stop()
        self.rollouts.stop()

        def stop_one(replica: Replica) -> None:
            with replica.lock:
                replica.stop()

        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            list(pool.map(stop_one, self.replicas))
        if self.recorder is not None:
            self.recorder.stop(timeout=30)  # after the replicas: its last pass reads what their workers wrote
        if self.status_server is not None:
            self.status_server.shutdown()
            self.status_server.server_close()
        (self.opts.run_dir / "supervisor.sock").unlink(missing_ok=True)
        log.info("stopped")

    # --- the gateway's view ---------------------------------------------------------------------
    def settings(self) -> GatewaySettings:
        """The gateway's settings: fixed for the life of the stack (replicas are reached through their hops)."""
        o = self.opts
        return GatewaySettings(run_dir=o.run_dir, log_dir=o.log_dir, public_inference=o.public_inference,
                               public_management=o.public_management, public_metrics=o.public_metrics,
                               max_body=o.max_body, capacity=self.capacity, large_bodies=o.large_bodies, photo_bodies=o.photo_bodies, access_log=o.access_log,
                               replicas=[r.index for r in self.replicas], public_grpc=o.public_grpc,
                               feedback="" if o.record else "recording is off in this stack (serve run --no-record)")

    def hop_settings(self, replica: Replica, ready: set[int]) -> HopSettings:
        """Its current route (or the last known one, mid-restart) and whether it is in rotation."""
        h = self.health[replica.index]
        try:
            self._routes[replica.index] = replica.route()
        except (OSError, ValueError, KeyError, AssertionError):  # mid-restart: no key file yet
            pass
        # Out of rotation while restarting, or while not ready and another replica is (none ready: keep trying all).
        why = "restarting" if h.restarting else ("not ready" if ready and replica.index not in ready else "")
        return HopSettings(run_dir=self.opts.run_dir, index=replica.index, route=self._routes.get(replica.index),
                           serving=not why, why=why, split=self.rollouts.split())

    def retire_probe_client(self, index: int) -> None:
        self._probe_clients.pop(index, None)

    def sync_hops(self, why: str, wait: bool = False) -> None:
        """Re-render every hop; reload those whose config changed. A config nginx refuses is logged, the running one kept.
        ``wait``: return once every reloaded hop serves its new configuration only (its old workers are gone)."""
        reloaded = []
        with self.render_lock:
            if self.stopping.is_set():
                return
            now = time.monotonic()
            ready = {i for i, h in self.health.items() if h.is_ready(now)}
            for r in self.replicas:
                hop = self.hops.get(r.index)
                if hop is None:
                    continue
                hop.settings = self.hop_settings(r, ready)
                try:
                    changed = hop.write()
                except Exception:
                    log.exception("%s not reloaded (%s): the running configuration stays", hop.name, why)
                    continue
                if changed:
                    reloaded.append((hop, hop.reload()))
                    log.info("%s reloaded (%s): %s", hop.name, why,
                             "in rotation" if hop.settings.serving else f"out of rotation, {hop.settings.why}")
        for hop, old_workers in reloaded if wait else []:
            if not hop.wait_reloaded(old_workers):
                log.warning("%s: old workers still running after 30 s (%s)", hop.name, why)

    def publish(self) -> None:
        """run/replicas.json: what GET /replicas on the management port answers; run/state.json for `serve stop`."""
        state = {"replicas": [r.describe() for r in self.replicas],
                 "capacity": self.capacity.to_json() if self.capacity else None,
                 "public": {"inference": self.opts.public_inference, "management": self.opts.public_management,
                            "metrics": self.opts.public_metrics}}
        replicas = self.opts.run_dir / "replicas.json"
        replicas.with_name("replicas.json.new").write_text(json.dumps(
            {"replicas": [{"index": r.index} for r in self.replicas], "capacity": state["capacity"]}, indent=2))
        os.replace(replicas.with_name("replicas.json.new"), replicas)  # readers never see half a file
        path = self.opts.run_dir / "state.json"
        write_private(path.with_name("state.json.new"),
                      json.dumps({**state, "model": self.opts.model, "pid": os.getpid(), "gateway_pid": self.gateway.pid() if self.gateway else None,
                                  "grpc_pid": self.grpc.pid() if self.grpc else None,
                                  "recorder_pid": self.recorder.pid() if self.recorder else None,
                                  "shadow_pid": self.shadow.pid() if self.shadow else None,
                                  "hop_pids": [hop.pid() for hop in self.hops.values()]}, indent=2))
        os.replace(path.with_name("state.json.new"), path)

    # --- supervision ----------------------------------------------------------------------------
    def supervise(self) -> None:
        """Until stop: restart what died, probe readiness, keep the gateway's rotation current."""
        next_probe = 0.0
        while not self.stopping.wait(0.5):
            for r in self.replicas:
                h = self.health[r.index]
                if not h.restarting and not r.alive():
                    self.restart(r)
            for nginx in [*self.hops.values(), *([self.gateway] if self.gateway else [])]:
                if nginx.pid() is None and not self.stopping.is_set():
                    self.restart_nginx(nginx)
            if self.grpc is not None and self.grpc.pid() is None and not self.stopping.is_set():
                self.restart_grpc()
            if self.recorder is not None and self.recorder.pid() is None and not self.stopping.is_set():
                self.restart_recorder()
            if self.shadow is not None and self.shadow.pid() is None and not self.stopping.is_set():
                self.restart_shadow()
            if time.monotonic() >= next_probe:
                self.probe_all()
                self.count_responses()
                self.rotate_access_log()
                next_probe = time.monotonic() + PROBE_INTERVAL_S

    def restart_nginx(self, nginx: Nginx) -> None:
        self.gateway_restarts += 1
        log.error("%s is gone: restarting it (restart %d)", nginx.name, self.gateway_restarts)
        try:
            with self.render_lock:
                nginx.write()
                nginx.start()
            self.publish()
        except Exception:
            log.exception("%s did not restart; trying again", nginx.name)

    def restart_grpc(self) -> None:
        self.grpc_restarts += 1
        log.error("%s is gone: restarting it (restart %d)", self.grpc.name, self.grpc_restarts)
        try:
            self.grpc.start()
            self.publish()
        except Exception:
            log.exception("%s did not restart; trying again", self.grpc.name)

    def restart_shadow(self) -> None:
        self.shadow_restarts += 1
        log.error("%s is gone: restarting it (restart %d)", self.shadow.name, self.shadow_restarts)
        try:
            self.shadow.start()
            self.publish()
        except Exception:
            log.exception("%s did not restart; trying again", self.shadow.name)

    def restart_recorder(self) -> None:
        self.recorder_restarts += 1
        log.error("%s is gone: restarting it (restart %d)", self.recorder.name, self.recorder_restarts)
        try:
            self.recorder.start()
            self.publish()
        except Exception:
            log.exception("%s did not restart; trying again", self.recorder.name)

    def count_responses(self) -> None:
        """Add the access log's new lines to ``gateway_http_responses_total`` (what clients were answered)."""
        path = self.opts.log_dir / "gateway_access.log"
        try:
            inode = path.stat().st_ino
        except OSError:
            return
        if self._log_position is None:  # the stack just started: earlier runs' lines are not ours to count
            self._log_position = (inode, path.stat().st_size)
        last_inode, offset = self._log_position
        if inode != last_inode:  # rotated since the last read: the new file is read from its start
            offset = 0
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only complete lines; the rest is read next time
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
                api = self._apis.get(str(entry["server"]), "other")
                if str(entry.get("uri", "")).startswith("/feedback/"):  # labels, not predictions: counted apart
                    api = "feedback"
                key = (api, str(entry["status"]))
            except (ValueError, KeyError, TypeError):
                continue
            self.responses[key] = self.responses.get(key, 0) + 1
        self._log_position = (inode, offset + end)

    def rotate_access_log(self) -> None:
        """logs/gateway_access.log: past ACCESS_LOG_MAX_BYTES, shift .1 .. .N and have nginx reopen it."""
        path = self.opts.log_dir / "gateway_access.log"
        try:
            if self.gateway is None or path.stat().st_size < ACCESS_LOG_MAX_BYTES:
                return
        except OSError:
            return
        self.count_responses()  # the lines up to the rotation are counted from this file
        for i in range(ACCESS_LOG_KEEP - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        path.replace(path.with_name(f"{path.name}.1"))
        self.gateway.reopen_logs()
        log.info("rotated %s (kept %d)", path, ACCESS_LOG_KEEP)

    def restart(self, replica: Replica) -> None:
        h = self.health[replica.index]
        h.restarts += 1
        h.restarting, h.ready = True, False
        log.error("replica %d: TorchServe frontend is gone: restarting it (restart %d)", replica.index, h.restarts)
        self.sync_hops(f"replica {replica.index} restarts")

        def run() -> None:
            try:
                with replica.lock:  # Stack.stop() takes the same lock: a replica launched here is stopped there
                    if self.stopping.is_set():
                        return
                    replica.stop()  # reap what may be left of it (workers, pid file)
                    replica.launch()
                self._probe_clients.pop(replica.index, None)
                replica.wait_ready(self.opts.model, self.opts.ready_timeout_s, self.stopping.is_set)
                h.ready, h.failures, h.checked_at, h.detail = True, 0, time.monotonic(), "answered after restart"
                log.info("replica %d is back (pid %s)", replica.index, replica.pid())
            except Exception as exc:
                log.error("replica %d did not come back: %s", replica.index, exc)
            finally:
                h.restarting = False
                self.sync_hops(f"replica {replica.index} restarted")
                self.publish()

        threading.Thread(target=run, name=f"restart-{replica.index}", daemon=True).start()

    def probe_client(self, replica: Replica) -> TorchServeClient:
        client = self._probe_clients.get(replica.index)
        if client is None:
            client = TorchServeClient(replica.client.endpoints, replica.client.key_file, timeout=PROBE_TIMEOUT_S)
            self._probe_clients[replica.index] = client
        return client

    def probe_all(self) -> None:
        before = {i for i, h in self.health.items() if h.is_ready(time.monotonic())}
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            list(pool.map(self.probe, [r for r in self.replicas if not self.health[r.index].restarting]))
        after = {i for i, h in self.health.items() if h.is_ready(time.monotonic())}
        if before != after:
            log.warning("ready replicas: %s -> %s", sorted(before), sorted(after))
            self.sync_hops(f"ready replicas now {sorted(after)}")

    def probe(self, replica: Replica) -> None:
        h = self.health[replica.index]
        try:
            resp = self.probe_client(replica).predict(self.opts.model, EXAMPLE.read_bytes(), check=False,
                                                      headers={PROBE_HEADER: "true"})
            ok = resp.status_code == 200
            detail = "answered a prediction" if ok else f"prediction answered HTTP {resp.status_code}: {resp.text[:120]}"
        except Exception as exc:  # timeouts, refused connections: not ready
            ok, detail = False, f"{type(exc).__name__}: {str(exc)[:160]}"
        h.checked_at, h.detail = time.monotonic(), detail
        if ok:
            h.ready, h.failures = True, 0
            self.refresh_models(replica)
        else:
            h.failures += 1
            if h.failures >= FAILURES_BEFORE_UNREADY:
                h.ready = False

    def refresh_models(self, replica: Replica) -> None:
        """The models and versions the replica serves, and whether each has a READY worker (v2 model readiness)."""
        try:
            client = self.probe_client(replica)
            models = {}
            for entry in client.models():
                name = entry["modelName"]
                models[name] = {d["modelVersion"]: any(w.get("status") == "READY" for w in d.get("workers", []))
                                for d in client.describe(name)}
            self.models[replica.index] = models
        except Exception as exc:  # the probe's own result decides readiness; this only refines it per model
            log.warning("replica %d: models not listed: %s", replica.index, str(exc)[:160])

    # --- /ready and /metrics --------------------------------------------------------------------
    def model_readiness(self, model: str, version: str | None) -> tuple[int, dict]:
        """GET /v2/models/<m>[/versions/<v>]/ready: 200 when a ready replica has a READY worker for it, 503 when
        none has now, 404 (v2 error) when no replica serves that model or version."""
        now = time.monotonic()
        ready = {i for i, h in self.health.items() if h.is_ready(now)}
        known = {v for models in self.models.values() for v in models.get(model, {})}
        if not known or (version is not None and version not in known):
            what = f"model {model!r}" + (f" version {version!r}" if version is not None else "")
            return 404, {"error": f"No {what} is served here; GET /v2/models/<model> lists a model's versions."}
        if version is None:  # the default version: what the readiness probe predicts with, for the probed model
            ok = bool(ready) if model == self.opts.model else any(
                any(self.models.get(i, {}).get(model, {}).values()) for i in ready)
        else:
            ok = any(self.models.get(i, {}).get(model, {}).get(version) for i in ready)
        return (200 if ok else 503), ({"name": model, "ready": ok} | ({"version": version} if version else {}))

    def readiness(self) -> tuple[int, dict]:
        now = time.monotonic()
        replicas = [{"index": i, **h.to_json(now)} for i, h in self.health.items()]
        ready = sum(r["ready"] for r in replicas)
        status = "Healthy" if ready else "Unhealthy"
        return (200 if ready else 503), {"status": status, "ready_replicas": ready, "replicas": replicas}

    def metrics(self) -> str:
        texts = {}
        for r in self.replicas:
            if self.health[r.index].restarting:
                continue
            try:
                texts[r.index] = self.probe_client(r).metrics_text()
            except Exception as exc:
                log.warning("replica %d metrics unavailable: %s", r.index, exc)
        now = time.monotonic()
        own = ["# HELP gateway_replica_restarts_total TorchServe frontends restarted by the supervisor.",
               "# TYPE gateway_replica_restarts_total counter"]
        own += [f'gateway_replica_restarts_total{{replica="{i}"}} {h.restarts}' for i, h in self.health.items()]
        own += ["# HELP gateway_replica_ready 1 when the replica answered the supervisor's last prediction probe.",
                "# TYPE gateway_replica_ready gauge"]
        own += [f'gateway_replica_ready{{replica="{i}"}} {int(h.is_ready(now))}' for i, h in self.health.items()]
        own += ["# HELP gateway_restarts_total nginx restarts by the supervisor (the gateway and the replicas' hops).", "# TYPE gateway_restarts_total counter",
                f"gateway_restarts_total {self.gateway_restarts}"]
        if self.grpc is not None:
            own += ["# HELP gateway_grpc_restarts_total Restarts of the gRPC service (scripts/deploy/grpc_service.py).",
                    "# TYPE gateway_grpc_restarts_total counter", f"gateway_grpc_restarts_total {self.grpc_restarts}"]
        own += ["# HELP gateway_http_responses_total Answers the gateway gave clients (after its retries), "
                "from its access log.", "# TYPE gateway_http_responses_total counter"]
        own += [f'gateway_http_responses_total{{api="{api}",code="{code}"}} {n}'
                for (api, code), n in sorted(self.responses.items())]
        if self.recorder is not None:
            own += ["# HELP gateway_recorder_restarts_total Restarts of the recorder (scripts/deploy/recorder.py).",
                    "# TYPE gateway_recorder_restarts_total counter", f"gateway_recorder_restarts_total {self.recorder_restarts}"]
        if self.capacity is not None:
            own += ["# HELP gateway_worker_cap Workers per replica the gateway allows (scripts/ops/capacity.py).",
                    "# TYPE gateway_worker_cap gauge", f"gateway_worker_cap {self.capacity.cap}"]
        own += self.rollout_metrics()
        recorded = self.recorder.metrics() if self.recorder is not None else ""
        shadowed = self.shadow.metrics() if self.shadow is not None else ""
        return merge_metrics(texts) + "\n".join(own) + "\n" + recorded + shadowed

    def rollout_metrics(self) -> list[str]:
        state = self.rollouts.state
        if state is None:
            return []
        lines = ["# HELP gateway_rollout_share The share of the model's default predictions each version answers "
                 "(1 = all; a canary splits it; a shadow candidate answers copies only, at 0).",
                 "# TYPE gateway_rollout_share gauge"]
        versions = {state.live: 1.0}
        if state.mode == "canary":
            versions = {state.live: 1 - state.percent / 100, state.candidate: state.percent / 100}
        elif state.candidate:
            versions = {state.live: 1.0, state.candidate: 0.0}
        lines += [f'gateway_rollout_share{{ModelName="{state.model}",ModelVersion="{v}"}} {share:g}'
                  for v, share in versions.items()]
        lines += ["# HELP gateway_rollout_shadow The share of the default predictions mirrored to the version (shadow).",
                  "# TYPE gateway_rollout_shadow gauge"]
        lines += [f'gateway_rollout_shadow{{ModelName="{state.model}",ModelVersion="{v}"}} '
                  f'{state.percent / 100 if state.mode == "shadow" and v == state.candidate else 0:g}' for v in versions]
        if self.shadow is not None:
            lines += ["# HELP gateway_shadow_restarts_total Restarts of the shadow sink (scripts/deploy/shadow.py).",
                      "# TYPE gateway_shadow_restarts_total counter", f"gateway_shadow_restarts_total {self.shadow_restarts}"]
        return lines

    def start_status_server(self) -> None:
        sock = self.opts.run_dir / "supervisor.sock"
        sock.unlink(missing_ok=True)
        stack = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = urlsplit(self.path).path
                if path == "/ready":
                    code, body = stack.readiness()
                    payload, ctype = json.dumps(body).encode(), "application/json"
                elif path == "/v2/ready":  # the Open Inference Protocol's shape of the same answer
                    code, _ = stack.readiness()
                    payload, ctype = json.dumps({"ready": code == 200}).encode(), "application/json"
                elif path == "/v2":  # server metadata
                    code, ctype = 200, "application/json"
                    payload = json.dumps({"name": "torchserve", "version": importlib.metadata.version("torchserve"),
                                          "extensions": V2_EXTENSIONS}).encode()
                elif V2_MODEL_READY.match(path):
                    model, version = (unquote(g) if g else None for g in V2_MODEL_READY.match(path).groups())
                    code, body = stack.model_readiness(model, version)
                    payload, ctype = json.dumps(body).encode(), "application/json"
                elif path == "/metrics":
                    code, payload, ctype = 200, stack.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8"
                elif ROLLOUT_ROUTE.match(path):
                    self.rollout("GET")
                    return
                else:
                    code, payload, ctype = 404, b'{"code":404}', "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_PUT(self):  # noqa: N802
                self.rollout("PUT")

            def do_POST(self):  # noqa: N802
                self.rollout("POST")

            def rollout(self, method: str) -> None:
                """/rollout/<model>: GET the state; PUT an action; POST /rollout/<model>/stage a version (async)."""
                match = ROLLOUT_ROUTE.match(urlsplit(self.path).path)
                try:
                    body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 65536))
                    if match is None:
                        code, answer = 404, {"code": 404, "type": "NotFound", "message": "Rollout routes: GET and PUT "
                                             "/rollout/<model>, POST /rollout/<model>/stage."}
                    else:
                        model, stage = match.groups()
                        doc = json.loads(body or b"{}") if method != "GET" else {}
                        if method == "GET" and not stage:
                            code, answer = 200, stack.rollouts.describe(model)
                        elif method == "PUT" and not stage:
                            code, answer = 200, stack.rollouts.act(model, doc)
                        elif method == "POST" and stage:
                            code, answer = 202, stack.rollouts.stage(model, doc)
                        else:
                            code, answer = 405, {"code": 405, "type": "MethodNotAllowed", "message": "GET or PUT "
                                                 "/rollout/<model> (state, action); POST /rollout/<model>/stage."}
                except RolloutError as exc:
                    code, answer = exc.status, exc.to_body()
                except ValueError as exc:
                    code, answer = 400, {"code": 400, "type": "BadRolloutRequest", "message": f"The body is not JSON: {exc}"}
                except Exception as exc:  # a replica failing mid-operation: say so, the state is unchanged or logged
                    log.exception("rollout request failed")
                    code, answer = 502, {"code": 502, "type": "RolloutFailed", "message":
                                         f"{type(exc).__name__}: {str(exc)[:300]}; logs/supervisor.log has the details. "
                                         "GET /rollout/<model> shows what applies now."}
                payload = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def address_string(self):
                return "gateway"

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.status_server = Server(str(sock), Handler)
        os.chmod(sock, 0o600)
        threading.Thread(target=self.status_server.serve_forever, name="status", daemon=True).start()


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(.*)$")


def merge_metrics(texts: dict[int, str]) -> str:
    """Several replicas' Prometheus texts as one: each family once, each sample labelled ``replica``."""
    families: dict[str, dict] = {}
    for index, text in sorted(texts.items()):
        current = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                parts = line.split(" ", 3)
                current = parts[2]
                fam = families.setdefault(current, {"HELP": None, "TYPE": None, "samples": []})
                fam[parts[1]] = fam[parts[1]] or line
                continue
            match = _SAMPLE.match(line)
            if not match:
                continue
            name, labels, value = match.groups()
            label = f'replica="{index}"'
            labels = f"{{{label},{labels[1:]}" if labels and labels != "{}" else f"{{{label}}}"
            family = current if current and name.startswith(current) else name
            families.setdefault(family, {"HELP": None, "TYPE": None, "samples": []})["samples"].append(
                f"{name}{labels} {value}")
    out = []
    for fam in families.values():
        out += [line for line in (fam["HELP"], fam["TYPE"]) if line] + fam["samples"]
    return "\n".join(out) + ("\n" if out else "")


def setup_logging(log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    if any(getattr(h, "_supervisor", False) for h in log.handlers):
        return
    handler = logging.handlers.RotatingFileHandler(log_dir / "supervisor.log", maxBytes=5 * 2**20, backupCount=3)
    handler._supervisor = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(asctime)s supervisor %(levelname)s %(message)s"))
    log.addHandler(stream)
    log.setLevel(logging.INFO)
