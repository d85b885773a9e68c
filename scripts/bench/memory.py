"""Memory per TorchServe worker, by Python environment (e.g. the CUDA torch build vs the CPU-only one).

    python -m scripts.bench.memory                                  # the running venv (.venv), model_store/fashion_cnn.mar
    python -m scripts.bench.memory --venv .venv /work/proto/cpuvenv # both installs, one after the other
    python -m scripts.bench.memory --venv /work/proto/cpuvenv --mar model_store/fashion_cnn.mar --hey-seconds 0

For each ``--venv``: a real TorchServe from the shipped config.properties (private
loopback ports, TMPDIR and keys: scripts/deploy/harness.py) serving copies of the ``--mar``
archives with their own model-config (the shipped one: 2 workers), started with that venv's
``bin/torchserve``. TorchServe 0.12 launches its workers with the Python that ran
``torchserve`` (model_server.py passes ``--python sys.executable`` to the frontend, which wins
over a ``python=`` key in config.properties), so the venv's torch, TorchServe and frontend jar
are the ones measured; the script checks that each worker's executable is the venv's Python and
which libtorch (and how many NVIDIA libraries) it mapped. Right after a server is ready:
``--requests`` predictions of ``--image`` per model, then one sample of every worker's RSS / USS /
PSS (psutil ``memory_full_info``) and of the frontend JVM's RSS. The servers are started one
after the other and stay up (idle) while the next starts; once all are up, ``--rounds`` rounds of
``hey -z --hey-seconds -c --concurrency`` with ``X-TTA: off`` go to each install in turn (the order
reversed every round, so drift in the machine's load is spread over the installs), then a second
memory sample. Writes ``--out`` (JSON) and prints a table. Worker RSS and USS do not depend on the
other servers being up; PSS divides pages shared with them (the same system libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

from scripts.deploy.harness import EXAMPLE, Server, write_config
from scripts.ops.tsclient import TorchServeClient
from scripts.train.data import REPO

MIB = 2**20
DEFAULT_MAR = REPO / "model_store" / "fashion_cnn.mar"
DEFAULT_OUT = REPO / "build" / "bench" / "memory.json"
DEFAULT_WORKDIR = REPO / "build" / "bench" / "memory"
TTA_OFF = {"X-TTA": "off"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, nargs="+", default=[Path(sys.prefix)],
                   help="virtual environments to serve from, measured one after the other "
                        "(each needs bin/python and bin/torchserve; default: the running one)")
    p.add_argument("--mar", type=Path, nargs="+", default=[DEFAULT_MAR],
                   help="archives to serve (the first one answers the readiness probe); default model_store/fashion_cnn.mar")
    p.add_argument("--image", type=Path, default=EXAMPLE, help="body of the predictions (a PNG)")
    p.add_argument("--requests", type=int, default=20, help="predictions per model before the first memory sample")
    p.add_argument("--hey-seconds", type=float, default=5.0, help="hey -z of one throughput round (0: no throughput run)")
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds per install, interleaved between installs")
    p.add_argument("--concurrency", type=int, default=16, help="hey -c")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="server folders (one per venv, replaced)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    return p


# --- environments -------------------------------------------------------------------------------------

def venv_tools(venv: Path) -> tuple[Path, Path]:
    """(python, torchserve) of ``venv``, without resolving symlinks (a venv's python links to the base one)."""
    venv = Path(os.path.abspath(venv))
    python, torchserve = venv / "bin" / "python", venv / "bin" / "torchserve"
    missing = [str(p) for p in (python, torchserve) if not p.exists()]
    if missing:
        raise SystemExit(f"{venv} is not a serving venv: missing {', '.join(missing)} "
                         "(pip install torchserve==0.12.0 torch pyyaml pillow numpy psutil requests into it)")
    return python, torchserve


def versions(python: Path) -> dict:
    """torch / torchserve versions and whether torch has CUDA, as that venv's Python sees them."""
    code = ("import json, importlib.metadata as m, torch; print(json.dumps({'torch': torch.__version__, "
            "'torchserve': m.version('torchserve'), 'cuda_build': torch.version.cuda, "
            "'python': __import__('platform').python_version()}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"{python} cannot import torch: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def label_for(venv: Path, taken: set[str]) -> str:
    name = Path(os.path.abspath(venv)).name or "venv"
    label, n = name, 2
    while label in taken:
        label, n = f"{name}-{n}", n + 1
    taken.add(label)
    return label


# --- the server -----------------------------------------------------------------------------------------

@dataclass
class VenvServer(Server):
    """harness.Server started and stopped with another venv's ``torchserve`` (so its workers run that venv's Python)."""

    venv: Path = field(default_factory=lambda: Path(sys.prefix))

    @property
    def env(self) -> dict:
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
        return {**env, "TMPDIR": str(tmp), "TEMP": str(tmp), "VIRTUAL_ENV": str(self.venv),
                "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}"}

    def launch(self, stdout=subprocess.DEVNULL) -> None:
        subprocess.run([str(venv_tools(self.venv)[1]), "--start", "--ts-config", str(self.config), "--ncs"],
                       cwd=self.workdir, env=self.env, check=True, stdout=stdout, stderr=subprocess.STDOUT)

    def stop(self, wait_s: float = 60.0) -> None:
        """``torchserve --stop`` (SIGTERM to the frontend, which returns at once), then wait until the
        frontend and its workers are gone, so the next measurement does not share the CPU with a shutdown."""
        procs = []
        pid = self.pid()
        if pid is not None:
            try:
                frontend = psutil.Process(pid)
                procs = [frontend, *frontend.children(recursive=True)]
            except psutil.Error:
                pass
        subprocess.run([str(venv_tools(self.venv)[1]), "--stop"], cwd=self.workdir, env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120)
        _, alive = psutil.wait_procs(procs, timeout=wait_s)
        if alive:
            print(f"warning: still running {wait_s:.0f} s after torchserve --stop: {[p.pid for p in alive]}", file=sys.stderr)


def model_name(mar: Path) -> str:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]


def start(venv: Path, mars: list[Path], workdir: Path) -> tuple[VenvServer, list[str]]:
    """A private TorchServe from ``venv`` serving copies of ``mars``; returns once every worker is READY."""
    if workdir.exists():
        shutil.rmtree(workdir)
    store = workdir / "model_store"
    store.mkdir(parents=True)
    for mar in mars:
        shutil.copy(mar, store / mar.name)
    models = [model_name(m) for m in mars]
    config = write_config(workdir, store, {"load_models": ",".join(m.name for m in mars)})
    srv = VenvServer(workdir, config, store, TorchServeClient.from_config(config, workdir), Path(os.path.abspath(venv)))
    srv.start(models[0], deadline_s=600)
    try:
        from scripts.bench.drive import wait_workers

        wait_workers(srv, models)
    except Exception:
        srv.stop()
        raise
    return srv, models


# --- measurements ---------------------------------------------------------------------------------------

def process_memory(pid: int) -> dict:
    """RSS, USS and PSS in MiB, the executable, the libtorch it mapped and how many NVIDIA libraries it mapped."""
    proc = psutil.Process(pid)
    full = proc.memory_full_info()
    libtorch, nvidia = None, set()
    for m in proc.memory_maps(grouped=True):
        path = m.path
        if libtorch is None and "/torch/lib/libtorch_cpu.so" in path:
            libtorch = path
        if "/nvidia/" in path or "/libcuda" in path or "/libnccl" in path:
            nvidia.add(path)
    return {"pid": pid, "exe": (proc.cmdline() or [proc.exe()])[0], "rss_mib": round(full.rss / MIB, 1),
            "uss_mib": round(full.uss / MIB, 1), "pss_mib": round(full.pss / MIB, 1), "libtorch": libtorch,
            "nvidia_libs_mapped": len(nvidia)}


def memory(srv: Server, models: list[str]) -> dict:
    """Every worker of every model, and the frontend JVM (RSS only: its USS is most of it)."""
    workers = []
    for m in models:
        for w in srv.client.describe(m)[0]["workers"]:
            try:
                workers.append({"model": m, **process_memory(int(w["pid"]))})
            except (psutil.Error, KeyError, ValueError):
                continue
    jvm = None
    pid = srv.pid()
    if pid is not None:
        try:
            jvm = {"pid": pid, "rss_mib": round(psutil.Process(pid).memory_info().rss / MIB, 1)}
        except psutil.Error:
            pass
    return {"workers": workers, "frontend_jvm": jvm,
            "workers_rss_mib": round(sum(w["rss_mib"] for w in workers), 1),
            "workers_uss_mib": round(sum(w["uss_mib"] for w in workers), 1),
            "workers_pss_mib": round(sum(w["pss_mib"] for w in workers), 1)}


def predictions(srv: Server, models: list[str], image: Path, n: int) -> dict:
    """``n`` predictions per model (TTA as configured); the first answer and the statuses."""
    body = image.read_bytes()
    out = {}
    for m in models:
        statuses: dict[int, int] = {}
        first = None
        for _ in range(n):
            resp = srv.client.predict(m, body, check=False)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if first is None and resp.status_code == 200:
                first = resp.json()
        out[m] = {"status": statuses, "label": (first or {}).get("label"), "confidence": (first or {}).get("confidence")}
    return out


def throughput(srv: Server, model: str, image: Path, concurrency: int, seconds: float) -> dict:
    """hey against ``model`` with X-TTA: off, as scripts/bench/run.py drives it (loopback only, the inference key)."""
    from scripts.bench.drive import hey

    res = hey(srv, model, image, "image/png", TTA_OFF, concurrency, seconds)
    keep = ("total_s", "requests_per_s", "ok_per_s", "p50_ms", "p90_ms", "p99_ms", "responses", "status", "error_count")
    return {"model": model, "concurrency": concurrency, "seconds": seconds, "headers": TTA_OFF,
            **{k: res[k] for k in keep}}


def prepare(venv: Path, label: str, args: argparse.Namespace) -> tuple[dict, VenvServer | None]:
    """Start ``venv``'s server, send the predictions, take the first memory sample."""
    python, _ = venv_tools(venv)
    row = {"label": label, "venv": os.path.abspath(venv), "python": str(python), **versions(python),
           "load_avg_start": [round(v, 2) for v in os.getloadavg()]}
    print(f"== {label}: torch {row['torch']} ({row['venv']}); load {row['load_avg_start'][0]:.2f}", flush=True)
    began = time.monotonic()
    srv, models = start(venv, args.mar, args.workdir / label)
    try:
        row["ready_s"] = round(time.monotonic() - began, 1)
        row["models"] = models
        row["predictions"] = predictions(srv, models, args.image, args.requests)
        row["memory"] = memory(srv, models)
    except BaseException:
        srv.stop()
        raise
    foreign = [w["exe"] for w in row["memory"]["workers"] if not w["exe"].startswith(row["venv"] + "/")]
    row["workers_use_venv"] = not foreign and bool(row["memory"]["workers"])
    if foreign:
        print(f"warning: {label}: workers ran {sorted(set(foreign))}, not {row['venv']}/bin/python", file=sys.stderr)
    return row, srv


def combine(rounds: list[dict]) -> dict:
    """hey rounds of one install -> requests/s over all of them (and each round's)."""
    seconds = sum(r["total_s"] or r["seconds"] for r in rounds)
    ok = sum(r["status"].get(200, 0) for r in rounds)
    return {"model": rounds[0]["model"], "concurrency": rounds[0]["concurrency"], "headers": TTA_OFF,
            "hey_seconds": rounds[0]["seconds"], "seconds": round(seconds, 2), "rounds": len(rounds),
            "ok_per_s": ok / seconds if seconds else 0.0,
            "ok_per_s_rounds": [round(r["ok_per_s"], 1) for r in rounds],
            "ok_per_s_median": statistics.median(r["ok_per_s"] for r in rounds),
            "p50_ms": sorted(r["p50_ms"] for r in rounds if r["p50_ms"] is not None)[len(rounds) // 2] if rounds else None,
            "p99_ms": max((r["p99_ms"] for r in rounds if r["p99_ms"] is not None), default=None),
            "responses": sum(r["responses"] for r in rounds), "error_count": sum(r["error_count"] for r in rounds),
            "load1_rounds": [r["load1"] for r in rounds]}


def run(args: argparse.Namespace) -> list[dict]:
    """Every install's server up at once (memory sampled per server while the others idle), then the hey
    rounds interleaved between them, the order reversed every round so that drift in the machine's load
    is spread over the installs instead of charged to whichever ran last."""
    taken: set[str] = set()
    rows, servers = [], []
    try:
        for venv in args.venv:
            row, srv = prepare(venv, label_for(venv, taken), args)
            rows.append(row)
            servers.append(srv)
        if args.hey_seconds > 0:
            per_install: list[list[dict]] = [[] for _ in rows]
            for r in range(args.rounds):
                order = list(range(len(rows)))[:: 1 if r % 2 == 0 else -1]
                for i in order:
                    load1 = round(os.getloadavg()[0], 2)
                    res = throughput(servers[i], rows[i]["models"][0], args.image, args.concurrency, args.hey_seconds)
                    per_install[i].append({**res, "load1": load1})
                    print(f"   round {r + 1} {rows[i]['label']:<12} {res['ok_per_s']:7.1f} req/s (load {load1:.2f})", flush=True)
            for row, srv, rounds in zip(rows, servers, per_install):
                row["throughput"] = combine(rounds)
                row["memory_after_load"] = memory(srv, row["models"])
    finally:
        for srv in servers:
            srv.stop()
    return rows


# --- report ---------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    """Plain-text table: one line per worker and one for the JVM of each install, then totals and req/s."""
    head = f"{'install':<12} {'torch':<14} {'process':<24} {'RSS MiB':>8} {'USS MiB':>8} {'PSS MiB':>8} " \
           f"{'RSS after load':>15} {'USS after load':>15}"
    lines = [head, "-" * len(head)]
    for r in result["runs"]:
        after = {w["pid"]: w for w in (r.get("memory_after_load") or {}).get("workers", [])}
        for i, w in enumerate(r["memory"]["workers"], 1):
            a = after.get(w["pid"], {})
            name = f"worker {i} ({w['model']})"
            lines.append(f"{r['label']:<12} {r['torch']:<14} {name:<24} {w['rss_mib']:>8.1f} "
                         f"{w['uss_mib']:>8.1f} {w['pss_mib']:>8.1f} {_num(a.get('rss_mib')):>15} {_num(a.get('uss_mib')):>15}")
        m = r["memory"]
        jvm = m.get("frontend_jvm") or {}
        jvm_after = ((r.get("memory_after_load") or {}).get("frontend_jvm") or {})
        lines.append(f"{r['label']:<12} {r['torch']:<14} {'frontend JVM':<24} {_num(jvm.get('rss_mib')):>8} "
                     f"{'':>8} {'':>8} {_num(jvm_after.get('rss_mib')):>15} {'':>15}")
        lines.append(f"{r['label']:<12} {r['torch']:<14} {'workers, sum':<24} {m['workers_rss_mib']:>8.1f} "
                     f"{m['workers_uss_mib']:>8.1f} {m['workers_pss_mib']:>8.1f}")
    lines.append("")
    for r in result["runs"]:
        t = r.get("throughput")
        answer = next(iter(r["predictions"].values()), {})
        tp = (f"{t['ok_per_s']:.1f} req/s (median round {t['ok_per_s_median']:.1f}) TTA off (hey -z {t['hey_seconds']:g}s -c {t['concurrency']} x {t['rounds']} "
              f"rounds: {t['ok_per_s_rounds']}), "
              f"p50 {_num(t['p50_ms'])} ms, p99 {_num(t['p99_ms'])} ms, errors {t['error_count']}") if t else "no throughput run"
        lines.append(f"{r['label']}: {tp}; ready in {r.get('ready_s', '?')} s; answer {answer.get('label')} "
                     f"{_num(answer.get('confidence'), 6)}; workers run {'the venv' if r.get('workers_use_venv') else 'ANOTHER'} python")
    return "\n".join(lines)


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(args: argparse.Namespace) -> dict:
    args.mar = [Path(os.path.abspath(m)) for m in args.mar]
    for m in args.mar:
        if not m.is_file():
            raise SystemExit(f"{m} is missing (make mar builds model_store/fashion_cnn.mar)")
    args.workdir = Path(os.path.abspath(args.workdir))
    for venv in args.venv:
        venv_tools(venv)
    result = {
        "command": "python -m scripts.bench.memory " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "archives": [str(m.relative_to(REPO)) if m.is_relative_to(REPO) else str(m) for m in args.mar],
        "image": str(args.image),
    }
    result["runs"] = run(args)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
