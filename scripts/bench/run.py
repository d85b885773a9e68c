"""Benchmark: our handler vs the raw model, a naive handler, a no-op handler and TorchServe's built-in one.

    make bench                                   # = python -m scripts.bench   (~20 min on 2 cores)
    python -m scripts.bench --quick              # short run (~6 min), same tables
    python -m scripts.bench --report-only        # rewrite docs/benchmarks.md from docs/benchmarks.json

One command regenerates everything: it installs ``hey`` (Debian) and the ``bench``
extra (scikit-learn for two real JPEG photos, captum for TorchServe's built-in
vision handlers) when missing, builds the ResNet-18 (scripts/train/build_resnet.py),
packages every archive, measures the in-process ceilings (scripts/bench/inproc.py),
then starts real TorchServe servers from the shipped config.properties (private
ports, TMPDIR and token keys, via scripts/deploy/harness.py) and drives them with
``hey`` on 127.0.0.1 only. Raw results go to docs/benchmarks.json (with the
system load average at the start of every scenario: other work on the machine
shows there) and docs/benchmarks.md is generated from them (scripts/bench/report.py).

Phases (each its own server; scenarios that are compared run back to back):

- ``fashion``: Fashion CNN at the shipped model-config (batch 8, 2 workers): our
  handler with TTA off / on (the spec's views, forced past the gate) / on (4 views), gated TTA on mixed
  traffic (held-out images, as many unsure ones as the held-out split has), int8 and fp32, the naive
  tutorial handler (scripts/bench/handlers/naive_handler.py) off / 2 / 4 views, the no-op handler
  (scripts/bench/handlers/noop_handler.py); concurrency 1, 8, 32.
- ``sweep``: our handler, TTA on, batch size 1/8/16 x workers 1/2; concurrency 1, 8, 16, 32.
- ``resnet``: scripted ResNet-18 with our handler vs TorchServe's ``image_classifier``,
  same .pt, 2 workers, batch 1 and 8, a 640x427 JPEG photo.
- ``resnet_omp1``: the built-in handler again with OMP_NUM_THREADS=1 in the server's
  environment, to show how much of the difference is thread oversubscription.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import tomllib
import yaml

from handler.loader import read_model
from handler.spec import ModelSpec
from scripts.deploy.harness import Server, write_config
from scripts.ops.tsclient import TorchServeClient
from scripts.train.data import REPO

BUILD = REPO / "build" / "bench"
HANDLERS = Path(__file__).resolve().parent / "handlers"  # the baseline handlers packaged into benchmark .mar files
FASHION_PT = REPO / "models" / "fashion_cnn.pt"
FASHION_IMAGE = REPO / "examples" / "ankle_boot.png"
SHIPPED_CONFIG = REPO / "handler" / "model-config.yaml"
VIEWS4 = ["identity", "hflip", "shift(1,0)", "shift(-1,0)"]
OFF = {"X-TTA": "off"}
ALL = {"X-TTA": "all"}  # every view for every image, whatever the gate
NAIVE_LIKE_OURS = {"naive": {"threads": "auto", "optimize": True}}  # our thread split and frozen model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run: 2 s per point, fewer concurrencies")
    p.add_argument("--phases", nargs="+", default=["inproc", "fashion", "sweep", "resnet", "resnet_omp1"],
                   choices=["inproc", "fashion", "sweep", "resnet", "resnet_omp1"])
    p.add_argument("--duration", type=float, default=None, help="seconds per Fashion scenario (default 6, quick 2)")
    p.add_argument("--resnet-duration", type=float, default=None, help="seconds per ResNet scenario (default 10, quick 3)")
    p.add_argument("--out-json", type=Path, default=REPO / "docs" / "benchmarks.json")
    p.add_argument("--out-md", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--workdir", type=Path, default=BUILD, help="archives, server folders, logs")
    p.add_argument("--report-only", action="store_true", help="only regenerate --out-md from --out-json")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing hey / the bench extra")
    return p


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


@dataclass
class Scenario:
    phase: str
    handler: str  # ours / naive / noop / builtin
    label: str
    model: str  # TorchServe model name
    concurrency: int
    headers: dict = field(default_factory=dict)
    tta_views: int = 1
    batch: int = 8
    workers: int = 2
    body: str = "fashion"  # fashion | photo | mix (several held-out images at once: hey_mix)
    threads: int | str = "auto"  # handler: threads in the model-config


def combine(rounds: list[dict]) -> dict:
    """One scenario's rounds -> totals (req/s over all rounds) and per-round medians of the percentiles."""
    def med(values):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    total_s = sum(r["total_s"] or 0 for r in rounds)
    ok = sum(r["status"].get(200, 0) for r in rounds)
    per_body = [sum(v) for v in zip(*(r["ok_per_body"] for r in rounds))] if "ok_per_body" in rounds[0] else None
    errors: dict = {}
    for r in rounds:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    status: dict = {}
    for r in rounds:
        for k, v in r["status"].items():
            status[k] = status.get(k, 0) + v
    return {
        "total_s": total_s,
        "ok_per_s": ok / total_s if total_s else 0.0,
        "requests_per_s": sum(r["responses"] for r in rounds) / total_s if total_s else 0.0,
        "p50_ms": med(r["p50_ms"] for r in rounds),
        "p90_ms": med(r["p90_ms"] for r in rounds),
        "p99_ms": med(r["p99_ms"] for r in rounds),
        "slowest_ms": max(r["slowest_ms"] for r in rounds),
        "responses": sum(r["responses"] for r in rounds),
        "status": status,
        "errors": errors,
        "error_count": sum(r["error_count"] for r in rounds),
        "rounds": rounds,
        **({"ok_per_body": per_body} if per_body is not None else {}),
    }


def run_scenarios(srv, scenarios: list[Scenario], bodies: dict, seconds: float, warmup: float, results: list,
                  rounds: int = 1) -> None:
    """Scenarios of the same concurrency run back to back, ``rounds`` times in turn, ``seconds / rounds`` each.

    Interleaving spreads slow drifts of the machine (other jobs starting or ending) over the scenarios
    that are compared, instead of charging them to whichever ran last.
    """
    by_conc: dict[int, list[Scenario]] = {}
    for sc in scenarios:
        by_conc.setdefault(sc.concurrency, []).append(sc)
    done = 0
    for conc, group in by_conc.items():
        per_round: dict[int, list] = {i: [] for i in range(len(group))}
        loads: dict[int, list] = {i: [] for i in range(len(group))}
        for r in range(rounds):
            for i, sc in enumerate(group):
                body, content_type = bodies[sc.body]
                drive = hey_mix if isinstance(body, list) else hey
                if r == 0 and warmup > 0:
                    drive(srv, sc.model, body, content_type, sc.headers, conc, warmup)
                loads[i].append([round(v, 2) for v in os.getloadavg()])
                res = drive(srv, sc.model, body, content_type, sc.headers, conc, seconds / rounds)
                res["load_avg_start"] = loads[i][-1]
                per_round[i].append(res)
        for i, sc in enumerate(group):
            row = {**asdict(sc), "seconds": seconds, "n_rounds": rounds, "load_avg_start": loads[i][0],
                   "load1_rounds": [lv[0] for lv in loads[i]]}
            row.update(combine(per_round[i]))
            results.append(row)
            done += 1
            print(f"[{sc.phase} {done}/{len(scenarios)}] {sc.label:<40} c={conc:<3} {row['ok_per_s']:8.1f} req/s  "
                  f"p50 {row['p50_ms'] or 0:7.1f}  p99 {row['p99_ms'] or 0:7.1f} ms  errors {row['error_count']}  "
                  f"load {loads[i][0][0]:.2f}", flush=True)


PROFILE_STAGES = (  # (category, substring of a py-spy frame), first match from the top of the stack wins
    ("preprocess", ".preprocess ("),
    ("inference (model forward + TTA merge)", ".inference ("),
    ("postprocess (JSON, quality metrics)", ".postprocess ("),
    ("stage metrics", "QualityMetrics"),
    ("no-op handle", "NoopHandler.handle"),
    ("idle: waiting for the next batch", "retrieve_msg"),
)


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def spy_profile(srv, sc: Scenario, bodies: dict, seconds: float) -> dict | None:
    """Sample one worker with py-spy (--idle) while hey drives ``sc``; time shares by handler stage."""
    spy = py_spy()
    if not spy:
        return None
    body, content_type = bodies[sc.body]
    pid = int(srv.client.describe(sc.model)[0]["workers"][0]["pid"])
    url = f"{srv.client.endpoints.inference}/predictions/{sc.model}"
    cmd = ["hey", "-z", f"{seconds + 2:g}s", "-c", str(sc.concurrency), "-m", "POST", "-T", content_type, "-D", str(body),
           "-H", f"Authorization: Bearer {srv.client.key('inference')}"]
    for k, v in sc.headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = srv.workdir / f"py-spy-{sc.model}-{sc.concurrency}.txt"
    load = subprocess.Popen([*cmd, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        rec = subprocess.run([spy, "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", "100", "-f", "raw", "-o", str(out),
                              "--idle", "--nonblocking"], capture_output=True, text=True, timeout=seconds + 60)
    finally:
        load.wait(timeout=seconds + 120)
    if rec.returncode != 0 or not out.exists():
        return {"error": (rec.stderr or rec.stdout)[-300:]}
    shares: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        category = next((name for name, frame in PROFILE_STAGES if frame in stack), "TorchServe worker (protocol, other)")
        shares[category] = shares.get(category, 0) + n
    return {"label": sc.label, "model": sc.model, "concurrency": sc.concurrency, "samples": total, "pid": pid,
            "shares": {k: round(v / total, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])} if total else {}}


def check_same_answers(srv, models: list[str], image: Path, headers: dict | None = None) -> dict:
    """Each model's top-1 answer for the same image (the naive handler must agree with ours)."""
    answers = {}
    for m in models:
        resp = srv.client.predict(m, image.read_bytes(), headers=headers or {}, check=False)
        try:
            answers[m] = json.loads(resp.text)  # the naive handler's JSON comes back as text/plain
        except ValueError:
            answers[m] = resp.text
    return answers


# --- phases -----------------------------------------------------------------------------------------

def mix_bodies(srv, model: str, workdir: Path, n: int = 8) -> tuple[list[Path], dict]:
    """``n`` held-out Fashion-MNIST images for mixed traffic, as many of them unsure (answered with the extra
    TTA views under the shipped gate) as the held-out split has: every held-out image is sent to ``model``
    once and its ``tta_views`` read, so the share comes from the server itself."""
    import io

    from PIL import Image

    from scripts.train.data import DEFAULT_DATA, load_idx_dir, split

    data = load_idx_dir(DEFAULT_DATA)
    held = split(data, seed=0).holdout
    pngs, views = [], []
    for i in held:
        buffer = io.BytesIO()
        Image.fromarray(data.images[i], mode="L").save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        views.append(json.loads(srv.client.predict(model, pngs[-1]).text)["tta_views"])
    unsure = [i for i, v in enumerate(views) if v > 1]
    share = len(unsure) / len(views)
    k = round(n * share)
    picked = unsure[:k] + [i for i, v in enumerate(views) if v == 1][: n - k]
    folder = workdir / "mix"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in picked:
        paths.append(folder / f"holdout_{held[i]}.png")
        paths[-1].write_bytes(pngs[i])
    return paths, {"holdout_images": len(views), "holdout_augmented_share": share, "images": [p.name for p in paths],
                   "augmented": [views[i] > 1 for i in picked], "tta_views": [views[i] for i in picked]}


def phase_fashion(ctx: dict, results: list, extra: dict) -> None:
    wd, cfg = ctx["workdir"], ctx["workdir"] / "configs"
    spec = fashion_spec_file(wd)
    shipped = derive_config(cfg / "fashion.yaml")
    fp32 = derive_config(cfg / "fashion-fp32.yaml", precision="fp32")
    four = derive_config(cfg / "fashion-4view.yaml", tta=VIEWS4)
    shipped_t = derive_config(cfg / "fashion-naive-threads.yaml", top=NAIVE_LIKE_OURS)
    four_t = derive_config(cfg / "fashion-4view-naive-threads.yaml", top=NAIVE_LIKE_OURS, tta=VIEWS4)
    archives = [
        {"kind": "ours", "name": "fashion_cnn", "config": shipped, "model": FASHION_PT},
        {"kind": "ours", "name": "fashion_cnn_fp32", "config": fp32, "model": FASHION_PT},
        {"kind": "ours", "name": "fashion_cnn_4v", "config": four, "model": FASHION_PT},
        {"kind": "naive", "name": "naive_fashion", "config": shipped, "model": FASHION_PT, "extra": [spec]},
        {"kind": "naive", "name": "naive_fashion_4v", "config": four, "model": FASHION_PT, "extra": [spec]},
        {"kind": "naive", "name": "naive_fashion_t", "config": shipped_t, "model": FASHION_PT, "extra": [spec]},
        {"kind": "naive", "name": "naive_fashion_4v_t", "config": four_t, "model": FASHION_PT, "extra": [spec]},
        {"kind": "noop", "name": "noop", "config": shipped},
    ]
    srv = start_server(wd / "srv_fashion", archives)
    try:
        extra["fashion_answers"] = {
            "tta_on": check_same_answers(srv, ["fashion_cnn_fp32", "naive_fashion"], FASHION_IMAGE, ALL),
            "tta_on_4v": check_same_answers(srv, ["fashion_cnn_4v", "naive_fashion_4v"], FASHION_IMAGE, ALL),
            "tta_off": check_same_answers(srv, ["fashion_cnn_fp32", "naive_fashion"], FASHION_IMAGE, OFF),
        }
        paths, extra["mix"] = mix_bodies(srv, "fashion_cnn", wd)
        views = len(fashion_spec().tta)
        extra["default_views"] = views
        bodies = {**ctx["bodies"], "mix": (paths, "image/png")}
        scenarios = []
        for c in ctx["conc"]:
            scenarios += [
                Scenario("fashion", "ours", "ours, TTA off", "fashion_cnn", c, OFF, 1),
                Scenario("fashion", "ours", "ours fp32, TTA off", "fashion_cnn_fp32", c, OFF, 1),
                Scenario("fashion", "ours", "ours, TTA on (default views)", "fashion_cnn", c, ALL, views),
                Scenario("fashion", "ours", "ours, TTA on (4 views)", "fashion_cnn_4v", c, ALL, 4),
                Scenario("fashion", "naive", "naive, TTA off", "naive_fashion", c, OFF, 1),
                Scenario("fashion", "naive", "naive, TTA on (default views)", "naive_fashion", c, {}, views),
                Scenario("fashion", "naive", "naive, TTA on (4 views)", "naive_fashion_4v", c, {}, 4),
                Scenario("fashion", "naive_t", "naive + our threads & frozen model, TTA off", "naive_fashion_t", c, OFF, 1),
                Scenario("fashion", "naive_t", "naive + our threads & frozen model, TTA on (default views)", "naive_fashion_t", c, {}, views),
                Scenario("fashion", "naive_t", "naive + our threads & frozen model, TTA on (4 views)", "naive_fashion_4v_t", c, {}, 4),
                Scenario("fashion", "noop", "no-op handler", "noop", c, {}, 0),
            ]
            if c > 1:  # mixed traffic needs a client per image at least
                scenarios += [
                    Scenario("fashion", "ours", "ours, mix, TTA off", "fashion_cnn", c, OFF, 1, body="mix"),
                    Scenario("fashion", "ours", "ours, mix, gated TTA (default)", "fashion_cnn", c, {}, views, body="mix"),
                    Scenario("fashion", "ours", "ours, mix, full TTA (every view)", "fashion_cnn", c, ALL, views, body="mix"),
                    Scenario("fashion", "ours", "ours fp32, mix, gated TTA", "fashion_cnn_fp32", c, {}, views, body="mix"),
                ]
        run_scenarios(srv, scenarios, bodies, ctx["seconds"], ctx["warmup"], results, ctx["rounds"])
        extra.setdefault("memory", {})["fashion"] = worker_memory(srv, [a["name"] for a in archives])
        # Where a worker's time goes (after the measurements, so sampling cannot disturb them).
        top = max(ctx["conc"])
        for sc in scenarios:
            if sc.concurrency == top and sc.label in ("ours, TTA off", "ours fp32, TTA off", "ours, TTA on (4 views)",
                                                      "naive + our threads & frozen model, TTA on (4 views)", "no-op handler"):
                extra.setdefault("profiles", []).append(spy_profile(srv, sc, ctx["bodies"], ctx["profile_seconds"]))
    finally:
        srv.stop()


def phase_sweep(ctx: dict, results: list, extra: dict) -> None:
    wd, cfg = ctx["workdir"], ctx["workdir"] / "configs"
    archives = []
    grid = [(b, w, "auto") for w in (1, 2) for b in (1, 8, 16)]
    grid += [(8, 1, 1), (8, 2, 2)]  # is threads: auto (cores // workers) right? the other split, at batch 8
    for batch, workers, threads in grid:
        name = f"fashion_b{batch}_w{workers}" + ("" if threads == "auto" else f"_t{threads}")
        config = derive_config(cfg / f"{name}.yaml", batch, workers, threads=threads)
        archives.append({"kind": "ours", "name": name, "config": config, "model": FASHION_PT, "batch": batch,
                         "workers": workers, "threads": threads})
    srv = start_server(wd / "srv_sweep", archives)
    try:
        scenarios = []
        for c in ctx["sweep_conc"]:
            for a in archives:
                label = (f"ours, TTA on, batch {a['batch']}, {a['workers']} worker{'s' if a['workers'] > 1 else ''}, "
                         f"threads {a['threads']}")
                sc = Scenario("sweep", "ours", label, a["name"], c, ALL, len(fashion_spec().tta), a["batch"], a["workers"])
                sc.threads = a["threads"]
                scenarios.append(sc)
        run_scenarios(srv, scenarios, ctx["bodies"], ctx["seconds"], ctx["warmup"], results, ctx["rounds"])
        extra.setdefault("memory", {})["sweep"] = worker_memory(srv, [a["name"] for a in archives])
    finally:
        srv.stop()


def resnet_archives(ctx: dict, batches=(1, 8), builtin_only: bool = False) -> list[dict]:
    from scripts.train.build_resnet import build

    paths = build()
    cfg = ctx["workdir"] / "configs"
    archives = []
    for b in batches:
        config = derive_config(cfg / f"resnet18_b{b}.yaml", b, 2, precision="fp32")  # no int8 ResNet: raw vs ours in fp32
        if not builtin_only:
            archives.append({"kind": "ours", "name": f"resnet18_b{b}", "config": config, "model": paths["model"],
                             "spec": paths["spec"], "batch": b})
        archives.append({"kind": "builtin", "name": f"builtin_resnet18_b{b}", "config": config, "model": paths["model"],
                         "extra": [paths["index_to_name"]], "batch": b})
    return archives


def raw_ceiling(ctx: dict, model: str, extra: dict, batches=(1, 8, 32)) -> None:
    """The bare model's images/s, measured right before its served scenarios, in fresh processes.

    Two ceilings: one process with all cores (torch threads = nproc), and nproc processes with one
    thread each running at the same time (how TorchServe's workers share the machine), summed.
    """
    seconds = ctx["inproc_seconds"]
    out = ctx["workdir"] / f"raw_{model}.json"
    subprocess.run([sys.executable, "-m", "scripts.bench.inproc", "--out", str(out), "--raw", model,
                    "--seconds", str(seconds), "--batches", *map(str, batches)], cwd=REPO, check=True)
    rows = [r for r in json.loads(out.read_text())["raw"]]
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > 1:
        for variant in ("exported", "served"):
            for b in batches:
                outs = [ctx["workdir"] / f"raw_{model}_{variant}_b{b}_p{i}.json" for i in range(nproc)]
                procs = [subprocess.Popen([sys.executable, "-m", "scripts.bench.inproc", "--out", str(o), "--raw", model,
                                           "--seconds", str(seconds), "--batches", str(b), "--threads", "1",
                                           "--rounds", "1", "--variants", variant],
                                          cwd=REPO, stdout=subprocess.DEVNULL) for o in outs]
                if any(p.wait() != 0 for p in procs):
                    raise RuntimeError(f"parallel raw measurement of {model} failed")
                parts = [json.loads(o.read_text())["raw"][0] for o in outs]
                rows.append({"model": model, "variant": variant, "batch": b, "threads": 1, "processes": nproc,
                             "images_per_s": sum(p["images_per_s"] for p in parts),
                             "ms_per_batch": sum(p["ms_per_batch"] for p in parts) / nproc,
                             "load1": parts[0]["load1"]})
                print(f"raw {model:<12} {variant:<9} batch {b:>2} {nproc} processes x 1 thread: "
                      f"{rows[-1]['images_per_s']:9.1f} images/s", flush=True)
    inproc = extra.setdefault("inproc", {"raw": [], "cases": []})
    inproc["raw"] = [r for r in inproc["raw"] if r["model"] != model] + rows


def phase_resnet(ctx: dict, results: list, extra: dict) -> None:
    raw_ceiling(ctx, "resnet18", extra)
    archives = resnet_archives(ctx)
    srv = start_server(ctx["workdir"] / "srv_resnet", archives)
    try:
        extra["resnet_answers"] = check_same_answers(srv, [a["name"] for a in archives], ctx["bodies"]["photo"][0], OFF)
        scenarios = []
        for c in ctx["resnet_conc"]:
            for a in archives:
                label = f"{'ours' if a['kind'] == 'ours' else 'built-in image_classifier'}, batch {a['batch']}"
                scenarios.append(Scenario("resnet", "ours" if a["kind"] == "ours" else "builtin", label, a["name"], c,
                                          OFF if a["kind"] == "ours" else {}, 1, a["batch"], 2, "photo"))
        scenarios.append(Scenario("resnet", "ours", "ours, TTA on (2 views), batch 8", "resnet18_b8", 8, {}, 2, 8, 2, "photo"))
        run_scenarios(srv, scenarios, ctx["bodies"], ctx["resnet_seconds"], ctx["resnet_warmup"], results, ctx["rounds"])
        extra.setdefault("memory", {})["resnet"] = worker_memory(srv, [a["name"] for a in archives])
        for sc in scenarios:
            if sc.concurrency == 8 and sc.batch == 8 and sc.tta_views == 1:
                extra.setdefault("profiles", []).append(spy_profile(srv, sc, ctx["bodies"], ctx["profile_seconds"]))
    finally:
        srv.stop()


def phase_resnet_omp1(ctx: dict, results: list, extra: dict) -> None:
    archives = [a for a in resnet_archives(ctx, batches=(8,)) if a["kind"] == "builtin"]
    # The harness waits for the first archive to answer the example PNG with a "label": ours does, the
    # built-in handler does not, so ours (unaffected by OMP_NUM_THREADS: it sets its threads) leads.
    ours = [a for a in resnet_archives(ctx, batches=(8,)) if a["kind"] == "ours"]
    srv = start_server(ctx["workdir"] / "srv_resnet_omp1", ours + archives, env={"OMP_NUM_THREADS": "1"})
    try:
        scenarios = [Scenario("resnet_omp1", "builtin", "built-in image_classifier, batch 8, OMP_NUM_THREADS=1",
                              "builtin_resnet18_b8", c, {}, 1, 8, 2, "photo") for c in ctx["resnet_conc"][1:]]
        run_scenarios(srv, scenarios, ctx["bodies"], ctx["resnet_seconds"], ctx["resnet_warmup"], results, ctx["rounds"])
    finally:
        srv.stop()


def phase_inproc(ctx: dict, extra: dict) -> None:
    """Raw model ceilings and each handler in-process, in a fresh Python process."""
    wd = ctx["workdir"]
    store = wd / "inproc_store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    cfg = wd / "configs"
    spec = fashion_spec_file(wd)
    shipped = derive_config(cfg / "fashion.yaml")
    four = derive_config(cfg / "fashion-4view.yaml", tta=VIEWS4)
    fashion = archive("ours", "fashion_cnn", store, shipped, FASHION_PT)
    fashion32 = archive("ours", "fashion_cnn_fp32", store, derive_config(cfg / "fashion-fp32.yaml", precision="fp32"),
                        FASHION_PT)
    fashion4 = archive("ours", "fashion_cnn_4v", store, four, FASHION_PT)
    shipped_t = derive_config(cfg / "fashion-naive-threads.yaml", top=NAIVE_LIKE_OURS)
    four_t = derive_config(cfg / "fashion-4view-naive-threads.yaml", top=NAIVE_LIKE_OURS, tta=VIEWS4)
    naive = archive("naive", "naive_fashion_t", store, shipped_t, FASHION_PT, extra=[spec])
    naive4 = archive("naive", "naive_fashion_4v_t", store, four_t, FASHION_PT, extra=[spec])
    img = ctx["bodies"]["fashion"][0]
    # One worker of the shipped 2-worker setup: 1 torch thread each (ours and naive + our threads set it).
    cases = [
        f"ours, TTA off={fashion}:{img}:X-TTA=off", f"ours fp32, TTA off={fashion32}:{img}:X-TTA=off",
        f"ours, TTA on (default views)={fashion}:{img}:X-TTA=all", f"ours, TTA on (4 views)={fashion4}:{img}:X-TTA=all", f"naive + our threads & frozen model, TTA off={naive}:{img}:X-TTA=off",
        f"naive + our threads & frozen model, TTA on (default views)={naive}:{img}", f"naive + our threads & frozen model, TTA on (4 views)={naive4}:{img}",
    ]
    photo_path = ctx["bodies"]["photo"][0]
    for a in resnet_archives(ctx, batches=(8,)):
        mar = archive(a["kind"], a["name"], store, a["config"], a.get("model"), a.get("spec"), a.get("extra"))
        if a["kind"] == "ours":
            cases.append(f"ResNet-18, ours, TTA off={mar}:{photo_path}:X-TTA=off")
        else:  # 1 thread like one of our 2 workers (as a server it keeps torch's default; see resnet_omp1)
            cases.append(f"ResNet-18, built-in, 1 thread={mar}:{photo_path}:@threads=1")
    raw_ceiling(ctx, "fashion_cnn", extra)
    out = wd / "inproc.json"
    cmd = [sys.executable, "-m", "scripts.bench.inproc", "--out", str(out), "--seconds", str(ctx["inproc_seconds"]),
           "--raw"]
    for c in cases:
        cmd += ["--case", c]
    subprocess.run(cmd, cwd=REPO, check=True)
    extra["inproc"]["cases"] = json.loads(out.read_text())["cases"]


def tta_accuracy() -> dict | None:
    """The shipped gate's accuracy against full TTA, from scripts.evaluate.tta's docs/tta.json (for the targets)."""
    path = REPO / "docs" / "tta.json"
    if not path.exists():
        return None
    gates = json.loads(path.read_text())["gates"]
    if not gates.get("chosen"):
        return None
    pick = next(r for r in gates["rows"] if r["metric"] == gates["chosen"]["metric"] and r["below"] == gates["chosen"]["below"])
    return {"gate": f"{pick['metric']} < {pick['below']}", "sets": {
        name: {"gated": pick[name]["accuracy"], "full": pick[name]["accuracy"] - pick[name]["delta_full"],
               "delta_full": pick[name]["delta_full"], "augmented": pick[name]["augmented"]}
        for name in ("holdout", "holdout_photos")}}


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


def main(args: argparse.Namespace) -> dict:
    from scripts.bench import report as bench_report

    if args.report_only:
        result = json.loads(args.out_json.read_text())
        args.out_md.write_text(bench_report.markdown(result))
        print(f"wrote {args.out_md} from {args.out_json}")
        return result

    started = time.time()
    ensure_hey(not args.no_install)
    ensure_bench_extra(not args.no_install)
    args.workdir = args.workdir.resolve()  # torchserve runs with the server folder as cwd
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Two runs sharing a workdir would delete each other's server folders (and key files) mid-run.
    lock = open(args.workdir / ".bench.lock", "w")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"another scripts.bench is running with --workdir {args.workdir}; wait for it or pass "
                         "another --workdir") from None
    quick = args.quick
    ctx = {
        "workdir": args.workdir,
        "seconds": args.duration or (2.0 if quick else 5.0),
        "warmup": 0.5,
        "resnet_seconds": args.resnet_duration or (3.0 if quick else 8.0),
        "resnet_warmup": 1.0,
        "inproc_seconds": 1.0 if quick else 3.0,
        "rounds": 1 if quick else 2,
        "profile_seconds": 3.0 if quick else 5.0,
        "conc": [1, 8, 16, 32],
        "sweep_conc": [1, 16] if quick else [1, 8, 16, 32],
        "resnet_conc": [1, 8, 32],
        "bodies": {"fashion": (FASHION_IMAGE, "image/png"), "photo": (photo(args.workdir), "image/jpeg")},
    }
    command = "python -m scripts.bench" + (" --quick" if quick else "") + (
        "" if args.phases == get_args_parser().get_default("phases") else " --phases " + " ".join(args.phases))
    result = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {k: v for k, v in ctx.items() if k not in ("workdir", "bodies")} | {
            "bodies": {k: [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p.name), ct] for k, (p, ct) in ctx["bodies"].items()},
            "body_bytes": {k: p.stat().st_size for k, (p, _) in ctx["bodies"].items()},
        },
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "scenarios": [],
        "phases": args.phases,
    }
    extra: dict = {"tta_accuracy": tta_accuracy()}
    phases = {"fashion": phase_fashion, "sweep": phase_sweep, "resnet": phase_resnet, "resnet_omp1": phase_resnet_omp1}
    for name in args.phases:
        t0 = time.time()
        print(f"== phase {name} (load {os.getloadavg()[0]:.2f}) ==", flush=True)
        if name == "inproc":
            phase_inproc(ctx, extra)
        else:
            phases[name](ctx, result["scenarios"], extra)
        result.setdefault("phase_seconds", {})[name] = round(time.time() - t0, 1)
        result.update(extra)
        # Partial results survive a crash without clobbering the last complete run in docs/.
        (args.workdir / "partial.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["total_seconds"] = round(time.time() - started, 1)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out_md.write_text(bench_report.markdown(result))
    print(f"wrote {args.out_json} and {args.out_md} in {result['total_seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
