"""What every benchmark drives: archives, servers, the gateway stack, and ``hey`` on loopback.

The shared half of ``scripts/bench``: ``run.py`` (``make bench``), ``gateway.py``, ``protocols.py``,
``uploads.py``, ``cost.py`` and ``memory.py`` build their archives (``archive``, ``derive_config``),
start real TorchServes through the integration tests' harness (``start_server``) or a whole
serving stack like ``make serve`` (``GatewayTarget``), drive them with ``hey`` (``hey``,
``hey_mix``, ``parse_hey``) and record the machine (``machine``). Nothing here decides what
is measured or writes a report.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomllib
import yaml

from handler.loader import read_model
from handler.spec import ModelSpec
from scripts.deploy.harness import Server, free_ports, write_config
from scripts.deploy.supervisor import Stack, StackOptions
from scripts.ops.tsclient import Endpoints, TorchServeClient
from scripts.train.data import REPO

BUILD = REPO / "build" / "bench"
HANDLERS = Path(__file__).resolve().parent / "handlers"  # the baseline handlers packaged into benchmark .mar files
FASHION_PT = REPO / "models" / "fashion_cnn.pt"
FASHION_IMAGE = REPO / "examples" / "ankle_boot.png"
SHIPPED_CONFIG = REPO / "handler" / "model-config.yaml"
OFF = {"X-TTA": "off"}
ALL = {"X-TTA": "all"}  # every view for every image, whatever the gate




# --- prerequisites ---------------------------------------------------------------------------------

def ensure_hey(install: bool = True) -> str:
    found = shutil.which("hey")
    if found:
        return found
    if not install:
        raise SystemExit("hey is not installed: apt-get install -y hey")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("installing hey (Debian package) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "hey"], env=env).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "hey"], env=env, check=True)
    return shutil.which("hey") or "hey"


def ensure_bench_extra(install: bool = True) -> None:
    """scikit-learn (sample photos), captum (imported by TorchServe's vision handlers) and py-spy."""
    missing = [m for m in ("sklearn", "captum") if importlib_missing(m)] + ([] if py_spy() else ["py-spy"])
    if not missing:
        return
    if not install:
        raise SystemExit(f"missing {missing}: pip install -e '.[bench]'")
    with open(REPO / "pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["bench"]
    print(f"installing the bench extra: {extra}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *extra], check=True)


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def photo(workdir: Path) -> Path:
    """china.jpg from scikit-learn's bundled sample images (640x427 JPEG), copied as is."""
    import sklearn.datasets

    src = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    dst = workdir / "china.jpg"
    if not dst.exists():
        shutil.copy(src, dst)
    return dst


# --- archives ---------------------------------------------------------------------------------------

def derive_config(path: Path, batch: int | None = None, workers: int | None = None, top: dict | None = None,
                  **handler) -> Path:
    """The shipped model-config.yaml with batchSize / workers / top-level keys / handler: settings changed."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    if batch is not None:
        config["batchSize"] = batch
    if workers is not None:
        config["minWorkers"] = config["maxWorkers"] = workers
    config.update(top or {})
    if handler:
        config["handler"] = {**(config.get("handler") or {}), **handler}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def archive(kind: str, name: str, store: Path, config: Path, model: Path | None = None, spec: Path | None = None,
            extra: list[Path] | None = None, handler_dir: Path | None = None) -> Path:
    """Package one .mar: ``ours`` with scripts.deploy.package; the others with the same torch-model-archiver call."""
    from scripts.deploy import package

    if kind == "ours":
        args = package.get_args_parser().parse_args([])
        args.model, args.spec, args.name, args.config, args.export_path = model, spec, name, config, store
        if handler_dir is not None:
            args.handler_dir = handler_dir
        return package.main(args)
    handler = {"naive": HANDLERS / "naive_handler.py", "noop": HANDLERS / "noop_handler.py",
               "builtin": "image_classifier"}[kind]
    cmd = [package.archiver(), "--model-name", name, "--version", "1.0", "--handler", str(handler),
           "--config-file", str(config), "--export-path", str(store), "--archive-format", "default", "--force"]
    if model:
        cmd += ["--serialized-file", str(model)]
    if extra:
        cmd += ["--extra-files", ",".join(str(p) for p in extra)]
    subprocess.run(cmd, check=True)
    return store / f"{name}.mar"


@functools.cache
def fashion_spec() -> ModelSpec:
    """The shipped Fashion CNN's spec, read from the .pt once (loading it loads the whole model)."""
    return read_model(FASHION_PT).spec


def fashion_spec_file(workdir: Path) -> Path:
    """The Fashion CNN's spec.json, copied out of the .pt (what package.py puts in the archive)."""
    spec = fashion_spec()
    path = workdir / "fashion_spec" / "spec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_json())
    return path


# --- servers ----------------------------------------------------------------------------------------

@dataclass
class BenchServer(Server):
    """The integration tests' Server, with extra environment variables for the TorchServe it starts."""

    extra_env: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        return {**super().env, **self.extra_env}


def start_server(workdir: Path, archives: list[dict], env: dict | None = None) -> BenchServer:
    """A real TorchServe from the shipped config.properties with ``archives`` loaded.

    ``archives``: [{"kind", "name", "config", "model", "spec", "extra"}]. The harness
    (scripts/deploy/harness.py) rewrites ports, paths and TMPDIR and waits until the
    first archive answers the example PNG with a label; the others are waited for by
    worker status.
    """
    if workdir.exists():
        shutil.rmtree(workdir)
    store = workdir / "model_store"
    store.mkdir(parents=True)
    for a in archives:
        archive(a["kind"], a["name"], store, a["config"], a.get("model"), a.get("spec"), a.get("extra"), a.get("handler_dir"))
    config = write_config(workdir, store, {"load_models": ",".join(f"{a['name']}.mar" for a in archives)})
    srv = BenchServer(workdir, config, store, TorchServeClient.from_config(config, workdir), dict(env or {}))
    srv.start(archives[0]["name"], deadline_s=600)
    try:
        wait_workers(srv, [a["name"] for a in archives])
    except Exception:
        srv.stop()
        raise
    return srv


def wait_workers(srv, models: list[str], deadline_s: float = 600) -> None:
    start = time.monotonic()
    while True:
        pending = []
        for m in models:
            try:
                workers = srv.client.describe(m)[0]["workers"]
            except Exception:
                workers = []
            if not workers or any(w["status"] != "READY" for w in workers):
                pending.append(m)
        if not pending:
            return
        if time.monotonic() - start > deadline_s:
            raise TimeoutError(f"workers not ready after {deadline_s:.0f} s: {pending}\n{srv.log_tail('ts_log.log')}")
        time.sleep(1)


def worker_memory(srv, models: list[str]) -> dict:
    """RSS and USS (MiB) of every worker process of each model, and of the frontend JVM."""
    out = {}
    for m in models:
        rows = []
        for w in srv.client.describe(m)[0]["workers"]:
            try:
                proc = psutil.Process(int(w["pid"]))
                full = proc.memory_full_info()
                rows.append({"pid": proc.pid, "rss_mib": full.rss / 2**20, "uss_mib": full.uss / 2**20})
            except (psutil.Error, KeyError, ValueError):
                continue
        out[m] = rows
    pid = srv.pid()
    try:
        if pid is not None:
            out["_frontend_jvm"] = [{"pid": pid, "rss_mib": psutil.Process(pid).memory_info().rss / 2**20}]
    except psutil.Error:
        pass
    return out


# --- load generation ---------------------------------------------------------------------------------

_NUM = r"([0-9.]+)"


def parse_hey(text: str) -> dict:
    def num(pattern):
        match = re.search(pattern, text)
        return float(match.group(1)) if match else None

    percentiles = {int(p): float(v) * 1000 for p, v in re.findall(r"^\s+(\d+)% in ([0-9.]+) secs", text, re.M)}
    slowest = (num(r"Slowest:\s+" + _NUM + " secs") or 0) * 1000
    # hey leaves out the p-th percentile when fewer than 100 / (100 - p) answers came back (p99: < 100).
    # For such n the nearest-rank percentile is the slowest answer, which hey does print.
    if "Latency distribution:" in text:
        for p in (50, 90, 99):
            percentiles.setdefault(p, slowest)
    statuses = {int(code): int(n) for code, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", text, re.M)}
    errors = {}
    if "Error distribution:" in text:
        for n, message in re.findall(r"^\s+\[(\d+)\]\s+(.+)$", text.split("Error distribution:", 1)[1], re.M):
            errors[message.strip()[:200]] = int(n)
    total_s = num(r"Total:\s+" + _NUM + " secs")
    ok = statuses.get(200, 0)
    return {
        "total_s": total_s,
        "requests_per_s": num(r"Requests/sec:\s+" + _NUM),
        "ok_per_s": ok / total_s if total_s else 0.0,
        "mean_ms": (num(r"Average:\s+" + _NUM + " secs") or 0) * 1000,
        "slowest_ms": slowest,
        "p50_ms": percentiles.get(50),
        "p90_ms": percentiles.get(90),
        "p99_ms": percentiles.get(99),
        "responses": sum(statuses.values()),
        "status": statuses,
        "non_200": sum(n for code, n in statuses.items() if code != 200),
        "errors": errors,
        "error_count": sum(errors.values()) + sum(n for code, n in statuses.items() if code != 200),
    }


def hey_command(srv, model: str, body: Path, content_type: str, headers: dict, concurrency: int, seconds: float,
                *options: str) -> list[str]:
    """``hey`` POSTing ``body`` to ``model`` on loopback with the inference key (``options``: more hey flags)."""
    url = f"{srv.client.endpoints.inference}/predictions/{model}"
    if not url.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"refusing to load anything but loopback: {url}")
    cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST", "-T", content_type, "-D", str(body),
           "-t", "60", *options, "-H", f"Authorization: Bearer {srv.client.key('inference')}"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    return [*cmd, url]


def hey(srv, model: str, body: Path, content_type: str, headers: dict, concurrency: int, seconds: float) -> dict:
    cmd = hey_command(srv, model, body, content_type, headers, concurrency, seconds)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr[-2000:]}")
    return parse_hey(out.stdout)


def hey_mix(srv, model: str, bodies: list[Path], content_type: str, headers: dict, concurrency: int,
            seconds: float) -> dict:
    """Traffic over several images at once: one ``hey -o csv`` per image, the concurrency split evenly
    between them, all started together; throughput and percentiles from every request's own row."""
    n = min(len(bodies), concurrency)
    shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
    procs = [subprocess.Popen(hey_command(srv, model, body, content_type, headers, c, seconds, "-o", "csv"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for body, c in zip(bodies[:n], shares)]
    latencies, statuses, per_body, end = [], {}, [], 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"hey failed ({proc.returncode}): {err[-2000:]}")
        ok = 0
        for line in out.splitlines()[1:]:  # response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
            cells = line.split(",")
            if len(cells) < 8:
                continue
            latency, code, offset = float(cells[0]), int(cells[6]), float(cells[7])
            latencies.append(latency * 1000)
            statuses[code] = statuses.get(code, 0) + 1
            ok += code == 200
            end = max(end, offset + latency)
        per_body.append(ok)
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, math.ceil(p / 100 * len(latencies)) - 1)] if latencies else None

    total_s = max(end, seconds)
    ok = statuses.get(200, 0)
    non_200 = sum(v for k, v in statuses.items() if k != 200)
    return {"total_s": total_s, "requests_per_s": len(latencies) / total_s, "ok_per_s": ok / total_s,
            "mean_ms": sum(latencies) / len(latencies) if latencies else 0.0, "slowest_ms": latencies[-1] if latencies else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "responses": len(latencies), "status": statuses,
            "non_200": non_200, "errors": {}, "error_count": non_200, "ok_per_body": per_body}



def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")



# --- machine ----------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    hey_version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True).stdout
    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
        "cpu_model": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchserve": version("torchserve"),
        "java": subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0],
        "hey": hey_version or "?",
        "kernel": platform.release(),
    }


class GatewayTarget:
    """A serving stack run in this process (gateway + replicas + supervisor thread)."""

    def __init__(self, root: Path, replicas: int, model: str, store: Path, load_models: str):
        ports = free_ports(3)
        self.opts = StackOptions(run_dir=root / "run", log_dir=root / "logs", key_file=root / "key_file.json",
                                 model_store=store, model=model, replicas=replicas,
                                 public_inference=f"127.0.0.1:{ports[0]}", public_management=f"127.0.0.1:{ports[1]}",
                                 public_metrics=f"127.0.0.1:{ports[2]}",
                                 replica_overrides={"load_models": load_models})
        self.stack = Stack(self.opts)
        self.client = TorchServeClient(Endpoints(*(f"http://{a}" for a in (self.opts.public_inference,
                                                                           self.opts.public_management,
                                                                           self.opts.public_metrics))),
                                       self.opts.key_file)

    def start(self):
        self.stack.start()
        self.thread = threading.Thread(target=self.stack.supervise, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stack.stopping.set()
        self.thread.join(timeout=30)
        self.stack.stop()
