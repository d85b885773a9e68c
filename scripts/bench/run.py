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
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from scripts.bench import report as bench_report
from scripts.bench.drive import (
    ALL,
    BUILD,
    FASHION_IMAGE,
    FASHION_PT,
    OFF,
    archive,
    derive_config,
    ensure_bench_extra,
    ensure_hey,
    fashion_spec,
    fashion_spec_file,
    hey,
    hey_mix,
    machine,
    photo,
    py_spy,
    start_server,
    worker_memory,
)
from scripts.train.data import REPO

VIEWS4 = ["identity", "hflip", "shift(1,0)", "shift(-1,0)"]
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


def main(args: argparse.Namespace) -> dict:
    if args.report_only:
        result = json.loads(args.out_json.read_text())
        bench_report.write_page(args.out_md, result)
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
    bench_report.write_page(args.out_md, result)
    print(f"wrote {args.out_json} and {args.out_md} in {result['total_seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
