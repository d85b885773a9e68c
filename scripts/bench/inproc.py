"""In-process ceilings for the benchmark (no TorchServe): raw model images/s and each handler's own cost.

    python -m scripts.bench.inproc --out build/bench/inproc.json                       # raw models only
    python -m scripts.bench.inproc --case ours_tta_on=build/bench/store/fashion_cnn.mar:examples/ankle_boot.png

Run by ``scripts.bench`` in a fresh process (clean torch thread settings, no server
running). Two kinds of measurement:

- **raw**: a TorchScript model on a random batch under ``torch.inference_mode()``,
  images/s at batch 1, 8 and 32, with all cores and with one thread: the compute
  ceiling, no decoding and no serving. Both as exported and as ``handler/loader.py``
  serves it (frozen, torch's inference passes), so the ceiling is never the slower one.
- **handler cases**: a .mar is unpacked and its handler is loaded as TorchServe's
  worker loads it (the handler file from the archive, the archive's model-config.yaml,
  TorchServe's real ``Context``); ``handle()`` is called on batches of identical
  requests in a loop. That is one worker's throughput without the frontend and the
  worker protocol, with the time split into preprocess / inference / postprocess
  and the top functions by own time under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import importlib.util
import inspect
import json
import os
import pstats
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import yaml

from scripts.train.data import REPO

RAW_MODELS = {
    "fashion_cnn": (REPO / "models" / "fashion_cnn.pt", (1, 28, 28)),
    "resnet18": (REPO / "build" / "resnet18" / "resnet18.pt", (3, 224, 224)),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON results")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per point")
    p.add_argument("--raw", nargs="*", default=list(RAW_MODELS), choices=list(RAW_MODELS), help="raw models to time")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: all cores, 1)")
    p.add_argument("--case", action="append", default=[],
                   help="LABEL=ARCHIVE.mar:BODY_FILE[:HEADER=VALUE...][:@threads=N]: time that archive's handler "
                        "in-process (@threads sets torch threads after initialize)")
    p.add_argument("--batch", type=int, default=8, help="requests per handle() call for the cases")
    p.add_argument("--profile-top", type=int, default=12, help="functions kept from each case's cProfile")
    p.add_argument("--rounds", type=int, default=2, help="interleaved turns per point (--seconds is split over them)")
    p.add_argument("--variants", nargs="+", default=["exported", "served"], choices=["exported", "served"],
                   help="raw model as exported, and/or as handler/loader.py serves it (frozen + inference passes)")
    return p


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def timed_loop(step, seconds: float, warmup: int = 3) -> tuple[int, float]:
    """Call ``step`` ``warmup`` times, then until ``seconds`` have passed (at least 3 times)."""
    for _ in range(warmup):
        step()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        step()
        n += 1
    return n, time.perf_counter() - start


def load_raw(name: str, variant: str):
    """The TorchScript model as exported, or as handler/loader.py serves it (frozen, inference passes)."""
    path, _ = RAW_MODELS[name]
    if variant == "exported":
        return torch.jit.load(str(path), map_location="cpu").eval()
    from handler import loader

    model, spec = loader.read_model(path)[:2]
    model = model.eval()
    return loader.optimized(model, spec, torch.device("cpu")) if hasattr(loader, "optimized") else model


def raw(name: str, batches: list[int], threads: list[int], seconds: float, rounds: int = 2,
        variant: str = "exported") -> list[dict]:
    """images/s of the bare model; the (threads, batch) points are measured in ``rounds`` interleaved turns."""
    _, shape = RAW_MODELS[name]
    model = load_raw(name, variant)
    points = [(t, b) for t in threads for b in batches]
    acc = {p: [0, 0.0] for p in points}
    loads = {p: [] for p in points}
    for r in range(rounds):
        for t, b in points:
            torch.set_num_threads(t)
            x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0))

            def step(x=x):
                with torch.inference_mode():
                    model(x)

            loads[(t, b)].append(os.getloadavg()[0])
            n, elapsed = timed_loop(step, seconds / rounds, warmup=3 if r == 0 else 1)
            acc[(t, b)][0] += n
            acc[(t, b)][1] += elapsed
    rows = []
    for (t, b), (n, elapsed) in acc.items():
        rows.append({"model": name, "variant": variant, "batch": b, "threads": t, "images_per_s": n * b / elapsed,
                     "ms_per_batch": 1000 * elapsed / n, "load1": loads[(t, b)][0], "load1_rounds": loads[(t, b)]})
        print(f"raw {name:<12} {variant:<9} batch {b:>2} threads {t}: {n * b / elapsed:9.1f} images/s", flush=True)
    return rows


# --- a TorchServe worker's handler, in-process ----------------------------------------------------

def load_handler(mar: Path, workdir: Path):
    """Unpack ``mar`` and load its handler as ts.model_loader does: (handler, context, manifest)."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    model_dir = workdir / mar.stem
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config_file = manifest["model"].get("configFile")
    yaml_config = yaml.safe_load((model_dir / config_file).read_text()) if config_file else {}
    entry = manifest["model"]["handler"]
    if entry.endswith(".py"):
        sys.path.insert(0, str(model_dir))
        module = importlib.import_module(Path(entry).stem)
    else:  # a built-in handler name
        module = importlib.import_module(f"ts.torch_handler.{entry}")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if len(classes) != 1:
        raise RuntimeError(f"{entry}: expected one handler class, found {[c.__name__ for c in classes]}")
    metrics = MetricsCacheYamlImpl(str(REPO / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest["model"]["modelName"]
    batch = int(yaml_config.get("batchSize", 1))
    ctx = Context(manifest["model"]["modelName"], str(model_dir), manifest, batch, None, "0.12.0",
                  metrics=metrics, model_yaml_config=yaml_config)
    handler = classes[0]()
    handler.initialize(ctx)
    return handler, ctx, manifest


class StageTimer:
    """Wrap a handler's preprocess/inference/postprocess (instance attributes) to add up their time."""

    STAGES = ("preprocess", "inference", "postprocess")

    def __init__(self, handler):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        for stage in self.STAGES:
            if hasattr(handler, stage):
                setattr(handler, stage, self._wrap(stage, getattr(handler, stage)))

    def _wrap(self, stage, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed


class Case:
    """One archive's handler, loaded once, fed batches of identical requests."""

    def __init__(self, label: str, spec: str, batch: int, workdir: Path):
        from ts.context import RequestProcessor

        self.label, self.batch = label, batch
        mar, body_file, *items = spec.split(":")
        pairs = [item.split("=", 1) for item in items]
        self.headers = {k: v for k, v in pairs if not k.startswith("@")}
        options = {k[1:]: v for k, v in pairs if k.startswith("@")}
        torch.set_num_threads(cores())  # what a fresh worker starts with; a handler may set its own
        self.handler, self.ctx, self.manifest = load_handler(Path(mar), workdir)
        if "threads" in options:  # @threads=N: override after initialize (for handlers that do not set it)
            torch.set_num_threads(int(options["threads"]))
        self.threads = torch.get_num_threads()
        self.archive = Path(mar).name
        self.data = [{"body": Path(body_file).read_bytes()} for _ in range(batch)]
        self._processor = RequestProcessor
        self.answer = self.step()[0]
        self.timer = StageTimer(self.handler)
        self.n, self.elapsed, self.loads = 0, 0.0, []
        self.stage_seconds = dict.fromkeys(StageTimer.STAGES, 0.0)

    def step(self):
        ctx, batch = self.ctx, self.batch
        ctx.request_processor = [self._processor(dict(self.headers)) for _ in range(batch)]
        ctx.request_ids = {i: f"req-{i}" for i in range(batch)}
        if ctx.metrics is not None:
            ctx.metrics.set_request_ids(ctx.request_ids)
        out = self.handler.handle(self.data, ctx)
        if len(out) != batch:
            raise RuntimeError(f"{self.label}: {len(out)} answers for {batch} requests")
        return out

    def measure(self, seconds: float, warmup: int) -> None:
        torch.set_num_threads(self.threads)
        for _ in range(warmup):
            self.step()
        self.loads.append(os.getloadavg()[0])
        before = dict(self.timer.seconds)
        n, elapsed = timed_loop(self.step, seconds, warmup=0)
        for k, v in self.timer.seconds.items():
            self.stage_seconds[k] += v - before[k]
        self.n += n
        self.elapsed += elapsed

    def profile(self, top: int) -> list[dict]:
        torch.set_num_threads(self.threads)
        calls = max(3, self.n // 8)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            self.step()
        profiler.disable()
        stats = pstats.Stats(profiler)
        total = sum(v[2] for v in stats.stats.values()) or 1.0
        hot = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        return [{"function": f"{Path(f).name}:{line}({fn})", "own_share": round(v[2] / total, 4),
                 "calls_per_batch": round(v[1] / calls, 1)} for (f, line, fn), v in hot]

    def row(self, top: int) -> dict:
        stages = {k: 1000 * v / self.n for k, v in self.stage_seconds.items() if v}
        answer = self.answer
        row = {
            "label": self.label, "archive": self.archive, "model": self.manifest["model"]["modelName"],
            "handler": self.manifest["model"]["handler"], "batch": self.batch, "headers": self.headers,
            "threads": self.threads, "requests_per_s": self.n * self.batch / self.elapsed,
            "ms_per_batch": 1000 * self.elapsed / self.n, "stage_ms_per_batch": stages,
            "answer": answer if isinstance(answer, (str, dict)) else str(answer), "profile": self.profile(top),
            "load1": self.loads[0], "load1_rounds": self.loads,
        }
        print(f"in-process {self.label:<42} batch {self.batch}: {row['requests_per_s']:8.1f} requests/s "
              f"({', '.join(f'{k} {v:.2f} ms' for k, v in stages.items())}) threads {self.threads}", flush=True)
        return row


def main(args: argparse.Namespace) -> dict:
    threads = args.threads or sorted({cores(), 1}, reverse=True)
    result = {"raw": [], "cases": []}
    for name in args.raw:
        if RAW_MODELS[name][0].exists():
            for variant in args.variants:
                result["raw"] += raw(name, args.batches, threads, args.seconds, args.rounds, variant)
    with tempfile.TemporaryDirectory(prefix="bench-inproc-") as tmp:
        cases = []
        for item in args.case:
            label, spec = item.split("=", 1)
            cases.append(Case(label, spec, args.batch, Path(tmp)))
        for r in range(args.rounds):  # interleaved, like the served scenarios
            for c in cases:
                c.measure(args.seconds / args.rounds, warmup=3 if r == 0 else 0)
        result["cases"] = [c.row(args.profile_top) for c in cases]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
