"""Operate a running TorchServe: one thin client of its inference, management and metrics APIs.

    python -m scripts.ops.ctl status                          # models, versions, workers (pid, state, RSS), queues
    python -m scripts.ops.ctl scale fashion_cnn --workers 3   # min = max = 3 (every replica), waits; capped
    python -m scripts.ops.ctl versions fashion_cnn
    python -m scripts.ops.ctl set-default fashion_cnn 2.0     # refuses a version with no READY worker
    python -m scripts.ops.ctl predict examples/*.png [--top-k 5] [--no-tta] [--json]
    python -m scripts.ops.ctl health                          # exit 0 when healthy, 1 otherwise
    python -m scripts.ops.ctl metrics [--save snap.prom]      # predictions per label, confidence, rejections, latency
    python -m scripts.ops.ctl drift --window 300              # live vs training-time reference, PSI verdict
    python -m scripts.ops.ctl feedback                        # labelled accuracy per version vs the held-out reference
    python -m scripts.ops.ctl export-labelled --out DIR       # the labelled answers as a class-per-folder tree
    python -m scripts.ops.ctl shadow fashion_cnn 2.0          # a copy of every default prediction to 2.0 (staged)
    python -m scripts.ops.ctl canary fashion_cnn 2.0 --percent 10   # 10 % of them answered by 2.0
    python -m scripts.ops.ctl promote fashion_cnn 2.0         # 2.0 answers everything, on every replica
    python -m scripts.ops.ctl rollback fashion_cnn            # back to the live version (or the one before a promote)
    python -m scripts.ops.ctl compare fashion_cnn 2.0 [--json]   # both versions on the same requests, and a verdict

Every command reads the keys from key_file.json in --workdir (default: the folder
of --config, which is where `make serve` starts TorchServe) and, when a key has
expired, renews it through the token API with the API key and retries once.
Exit codes: 0 success, 1 a failed check (unhealthy, a failed prediction, drift
ALERT, a refused operation), 2 TorchServe unreachable or an API error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from scripts.ops import capacity, compare, drift, feedback
from scripts.ops.capacity import Capacity
from scripts.ops.tsclient import REPO, ApiError, TorchServeClient, model_store

MODEL = "fashion_cnn"
MIB = 1024 * 1024


class Refused(RuntimeError):
    """An operation ctl will not do (it would break serving); exit code 1."""


# --- shared argument groups (also used by scripts.ops.client and scripts.ops.workers) ----
def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=REPO / "config.properties",
                   help="TorchServe config.properties (addresses, model store); default: the repository's")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder TorchServe was started from (holds key_file.json); default: the config's folder")


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--version", default=None, help="a specific version (default: the model's default version)")
    p.add_argument("--top-k", type=int, default=None, help="how many ranked classes to return (X-Top-K)")
    p.add_argument("--no-tta", action="store_true", help="one view only (X-TTA: off)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answers")
    p.add_argument("--parallel", type=int, default=4, help="requests in flight at once")


def add_scale_args(p: argparse.ArgumentParser, workers_required: bool = True) -> None:
    p.add_argument("--workers", type=int, required=workers_required, help="min = max = this many workers")
    p.add_argument("--version", default=None, help="the version to scale (default: the default version)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the workers")
    p.add_argument("--force", action="store_true", help="allow scaling the default version to 0 workers")


def connect(args: argparse.Namespace) -> TorchServeClient:
    return TorchServeClient.from_config(args.config, args.workdir)


# --- state ----------------------------------------------------------------------
def memory_mib(pid, local: bool) -> tuple[float | None, float | None]:
    """(RSS, USS) of a worker process in MiB; TorchServe reports memoryUsage 0 on CPU.

    RSS counts the shared torch libraries in every worker; USS (unique set size) is
    what removing that worker would free.
    """
    if not local or not pid:
        return None, None
    try:
        import psutil

        process = psutil.Process(int(pid))
        try:
            info = process.memory_full_info()
            return info.rss / MIB, info.uss / MIB
        except psutil.AccessDenied:
            return process.memory_info().rss / MIB, None
    except Exception:  # gone, not ours, psutil missing
        return None, None


def model_state(client: TorchServeClient, model: str) -> list[dict]:
    """One dict per version: default?, archive, worker limits, workers (pid, state, RSS), queue."""
    default = client.default_version(model)
    local = client.endpoints.is_local()
    out = []
    for d in client.describe(model):
        queue = d.get("jobQueueStatus") or {}
        out.append({
            "model": d["modelName"],
            "version": d["modelVersion"],
            "default": d["modelVersion"] == default,
            "archive": d.get("modelUrl"),
            "min_workers": d.get("minWorkers"),
            "max_workers": d.get("maxWorkers"),
            "batch_size": d.get("batchSize"),
            "max_batch_delay_ms": d.get("maxBatchDelay"),
            "queue_pending": queue.get("pendingRequests"),
            "queue_free": queue.get("remainingCapacity"),
            "workers": [
                dict(zip(("id", "pid", "status", "rss_mib", "uss_mib"),
                         (w.get("id"), w.get("pid"), w.get("status"), *memory_mib(w.get("pid"), local))))
                for w in d.get("workers", [])
            ],
        })
    return out


def ready(version_state: dict) -> int:
    return sum(w["status"] == "READY" for w in version_state["workers"])


def format_state(versions: list[dict]) -> str:
    lines = []
    for v in versions:
        rss = [w["rss_mib"] for w in v["workers"] if w["rss_mib"] is not None]
        uss = [w["uss_mib"] for w in v["workers"] if w["uss_mib"] is not None]
        memory = f"  RSS {sum(rss):.0f} MiB" if rss else ""
        memory += f" (unique {sum(uss):.0f} MiB)" if uss else ""
        lines.append(
            f"{v['model']} {v['version']}{' (default)' if v['default'] else ''}  archive {v['archive']}  "
            f"workers {ready(v)}/{len(v['workers'])} READY (min {v['min_workers']}, max {v['max_workers']})  "
            f"batch {v['batch_size']}/{v['max_batch_delay_ms']} ms  queue {v['queue_pending']} pending, "
            f"{v['queue_free']} free{memory}"
        )
        for w in v["workers"]:
            mem = f"RSS {w['rss_mib']:.0f} MiB" if w["rss_mib"] is not None else "RSS n/a"
            mem += f", unique {w['uss_mib']:.0f} MiB" if w["uss_mib"] is not None else ""
            lines.append(f"    worker {w['id']}  pid {w['pid']}  {w['status']:<9} {mem}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    client = connect(args)
    health = client.request("inference", "GET", "/ping", check=False)
    health_text = health.json().get("status", health.text) if health.ok else f"HTTP {health.status_code}"
    models = [m["modelName"] for m in client.models()]
    state = {m: model_state(client, m) for m in models}
    if args.json:
        print(json.dumps({"health": health_text, "models": state}, indent=2))
        return 0
    print(f"TorchServe {client.endpoints.management}: {health_text}; {len(models)} model(s)")
    for m in models:
        print(format_state(state[m]))
    return 0


def cmd_versions(args) -> int:
    state = model_state(connect(args), args.model)
    print(json.dumps(state, indent=2) if args.json else format_state(state))
    return 0


def worker_limit(client: TorchServeClient, model: str) -> tuple[Capacity | None, list[int] | None]:
    """The worker cap and the replicas to scale.

    Through the gateway: the cap it enforces and its replicas (GET /replicas). A TorchServe
    reached directly: the same rule (scripts/ops/capacity.py) applied to its workers,
    measured here when it runs on this machine; (None, None) when it cannot be measured.
    """
    resp = client.request("management", "GET", "/replicas", check=False)
    if resp.status_code == 200:
        body = resp.json()
        return Capacity.from_json(body["capacity"]), [r["index"] for r in body["replicas"]]
    if not client.endpoints.is_local():
        return None, None
    pids = [w["pid"] for d in client.describe(model) for w in d.get("workers", []) if w.get("pid")]
    try:
        frontend = psutil.Process(int(pids[0])).parent().pid
        return capacity.measure([frontend]), None
    except (IndexError, psutil.Error, RuntimeError, ValueError):
        return None, None


def cmd_scale(args) -> int:
    client = connect(args)
    if args.workers < 0:
        raise Refused("--workers must be 0 or more")
    cap, replicas = worker_limit(client, args.model)
    if cap is not None and args.workers > 0 and (why := cap.check(args.workers)):
        raise Refused(why)
    if cap is None and args.workers > 0:
        print("warning: could not measure this server's capacity; the worker count is not checked", file=sys.stderr)
    version = args.version or client.default_version(args.model)
    if args.workers == 0 and version == client.default_version(args.model) and not args.force:
        raise Refused(f"{args.model} {version} is the default version: 0 workers would fail every request "
                      "(set another default first, or pass --force)")
    # 0 workers got past the check above: not the default version, or --force. The gateway, which cannot
    # tell versions apart, refuses any 0 without force=true; ctl has decided, so it says so.
    for prefix in [f"/replicas/{i}" for i in replicas] if replicas else [""]:
        answer = client.scale(args.model, args.workers, version=version, timeout=args.timeout,
                              prefix=prefix, force=args.workers == 0)
        print(f"{prefix.strip('/') or args.model}: {answer.get('status', answer)}")
    if not replicas:
        print(format_state(model_state(client, args.model)))
    return 0


def cmd_set_default(args) -> int:
    client = connect(args)
    _, replicas = worker_limit(client, args.model)
    prefixes = [f"/replicas/{i}" for i in replicas] if replicas else [""]
    for prefix in prefixes:  # every replica is checked before any is changed: they never disagree on the default
        versions = client.request("management", "GET", f"{prefix}/models/{args.model}/all").json()
        target = next((v for v in versions if v["modelVersion"] == args.version), None)
        where = f" on {prefix.strip('/')}" if prefix else ""
        if target is None:
            raise Refused(f"{args.model} has no version {args.version} loaded{where} "
                          f"(loaded: {', '.join(v['modelVersion'] for v in versions)})")
        if not any(w.get("status") == "READY" for w in target.get("workers", [])) and not args.force:
            raise Refused(f"{args.model} {args.version} has no READY worker{where}: as default it would answer 503 "
                          f"(scale it first: ctl scale {args.model} --version {args.version} --workers N, or pass --force)")
    for prefix in prefixes:
        print(f"{prefix.strip('/') or args.model}: {client.set_default(args.model, args.version, prefix=prefix).get('status')}")
    print(format_state(model_state(client, args.model)))
    return 0


# --- predict / health ---------------------------------------------------------------
def predict_files(client: TorchServeClient, args) -> list[dict]:
    """One request per file, ``args.parallel`` in flight; never raises for a file."""
    headers = {}
    if args.top_k is not None:
        headers["X-Top-K"] = str(args.top_k)
    if args.no_tta:
        headers["X-TTA"] = "off"

    def one(path: Path) -> dict:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return {"file": str(path), "status": None, "error": f"{type(exc).__name__}: {exc.strerror or exc}"}
        resp = client.predict(args.model, data, version=args.version, headers=headers, check=False)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        return {"file": str(path), "status": resp.status_code, "model_version": resp.headers.get("X-Model-Version"),
                "response": body}

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        return list(pool.map(one, args.images))


def format_answer(r: dict) -> str:
    if r["status"] != 200:
        body = r.get("response")
        message = body.get("message", body) if isinstance(body, dict) else (body or r.get("error"))
        kind = body.get("type", "") if isinstance(body, dict) else ""
        return " ".join(str(x) for x in (f"{r['file']}: FAILED", r["status"], kind, message) if x)
    body = r["response"]
    items = body if isinstance(body, list) else [body]
    parts = []
    for item in items:
        flag = "  UNCERTAIN" if item["uncertain"] else ""
        flag += ", OUT OF DISTRIBUTION" if item.get("out_of_distribution") else ""
        ranked = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in item["top_k"][1:])
        parts.append(f"{item['label']} {item['confidence']:.3f}{flag}  (tta views {item['tta_views']}"
                     f"{'; then ' + ranked if ranked else ''})")
    return f"{r['file']}: " + " | ".join(parts) + f"  [v{r['model_version']}]"


def cmd_predict(args) -> int:
    results = predict_files(connect(args), args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(format_answer(r))
    return 0 if all(r["status"] == 200 for r in results) else 1


def cmd_health(args) -> int:
    """/ping with the inference key (renewed if expired), and each model's default version READY."""
    try:
        return _health(connect(args), args)
    except (requests.RequestException, ApiError, RuntimeError) as exc:
        print(f"UNHEALTHY: {exc}")
        return 1


def _health(client: TorchServeClient, args) -> int:
    problems = []
    resp = client.request("inference", "GET", "/ping", check=False)
    status = resp.json().get("status") if resp.ok else None
    if status != "Healthy":
        problems.append(f"/ping answered HTTP {resp.status_code}: {resp.text.strip()[:200]}")
    models = [args.model] if args.model else [m["modelName"] for m in client.models()]
    for model in models:
        try:
            default = next(v for v in model_state(client, model) if v["default"])
        except ApiError as exc:
            problems.append(str(exc))
            continue
        if ready(default) == 0:
            problems.append(f"{model} {default['version']} (default) has no READY worker")
        else:
            print(f"{model} {default['version']}: {ready(default)} READY worker(s)")
    if problems:
        print("UNHEALTHY: " + "; ".join(problems))
        return 1
    print(f"Healthy ({client.endpoints.inference})")
    return 0


# --- metrics / drift ----------------------------------------------------------------------
def fmt_share(count: float, total: float) -> str:
    return f"{count:g} ({count / total:.1%})" if total else f"{count:g}"


def summarize(snap: drift.Snapshot, title: str, reference_ood: float | None = None) -> str:
    n = snap.predictions
    lines = [f"{title}: {n:g} predictions, {sum(snap.rejected.values()):g} rejected requests"]
    labels = sorted(snap.labels.items(), key=lambda kv: (-kv[1], kv[0]))
    lines.append("  per label:    " + (", ".join(f"{k} {fmt_share(v, n)}" for k, v in labels if v) or "none"))
    bins = [(lo, hi, c) for lo, hi, c in drift.bin_counts(snap.confidence) if c]
    median = drift.quantile(snap.confidence, 0.5)
    lines.append("  confidence:   " + (", ".join(f"({lo:g}, {hi:g}] {fmt_share(c, n)}" for lo, hi, c in bins) or "none")
                 + (f"; median ~{median:.2f}" if median is not None else ""))
    lines.append(f"  uncertain:    {fmt_share(snap.uncertain, n)}   TTA views disagreeing: {fmt_share(snap.disagreement, n)}")
    lines.append(f"  out of distribution: {fmt_share(snap.ood, n)}"
                 + (f" (held-out reference: {reference_ood:.1%})" if reference_ood is not None else ""))
    lines.append("  rejected:     " + (", ".join(f"{k} {v:g}" for k, v in sorted(snap.rejected.items()) if v) or "none"))
    stages = []
    for stage in ("preprocess", "inference", "postprocess", *sorted(set(snap.latency) - {"preprocess", "inference", "postprocess"})):
        hist = snap.latency.get(stage)
        if not hist or not hist.get(max(hist)):
            continue
        p50, p90 = drift.quantile(hist, 0.5), drift.quantile(hist, 0.9)
        stages.append(f"{stage} p50 ~{p50 * 1000:.1f} ms, p90 ~{p90 * 1000:.1f} ms (n={hist[max(hist)]:g} batches)")
    lines.append("  latency:      " + ("; ".join(stages) or "none"))
    return "\n".join(lines)


def snapshot_json(snap: drift.Snapshot) -> dict:
    return {
        "predictions": snap.predictions, "labels": snap.labels, "uncertain": snap.uncertain, "out_of_distribution": snap.ood,
        "disagreement": snap.disagreement, "rejected": snap.rejected,
        "confidence_buckets": {("+Inf" if b == float("inf") else f"{b:g}"): c for b, c in sorted(snap.confidence.items())},
        "latency_p50_s": {s: drift.quantile(h, 0.5) for s, h in snap.latency.items()},
        "latency_p90_s": {s: drift.quantile(h, 0.9) for s, h in snap.latency.items()},
    }


def cmd_metrics(args) -> int:
    client = connect(args)
    text = client.metrics_text()
    if args.save:
        args.save.write_text(text)
    since = args.since.read_text() if args.since else ""
    versions = sorted(drift.Snapshot.from_text(text, args.model).versions)
    if args.version:
        versions = [args.version]
    out = {}
    for version in versions:
        snap = drift.Snapshot.from_text(text, args.model, version).minus(drift.Snapshot.from_text(since, args.model, version))
        out[version] = snap
    if args.json:
        print(json.dumps({v: snapshot_json(s) for v, s in out.items()}, indent=2))
        return 0
    where = f" since {args.since}" if args.since else " since the server started"
    if not out:
        print(f"no metrics for {args.model} yet{where}")
    for version, snap in out.items():
        print(summarize(snap, f"{args.model} {version}{where}", reference_ood_rate(client, args, version)))
    if args.save:
        print(f"saved the raw snapshot to {args.save}")
    return 0


def load_reference(path: Path) -> dict:
    """reference.json from a .json file, a .mar archive, or a TorchScript .pt (its extra files)."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".mar":
        with zipfile.ZipFile(path) as mar:
            names = [n for n in mar.namelist() if n.rsplit("/", 1)[-1] == "reference.json"]
            if not names:
                raise Refused(f"{path} holds no reference.json")
            return json.loads(mar.read(sorted(names, key=len)[0]))
    if path.suffix == ".pt":
        from handler.loader import read_model

        reference = read_model(path).reference
        if not reference:
            raise Refused(f"{path} carries no reference.json")
        return reference
    raise Refused(f"{path}: expected a .json, .mar or .pt file")


def reference_ood_rate(client: TorchServeClient, args, version: str) -> float | None:
    """The held-out share flagged out of distribution, from the served archive's reference (None if unknown)."""
    try:
        return load_reference(archive_path(client, args, args.model, version)).get("ood_rate")
    except (Refused, ApiError, OSError, KeyError, IndexError, ValueError, requests.RequestException):
        return None


def archive_path(client: TorchServeClient, args, model: str, version: str) -> Path:
    url = client.describe(model, version)[0]["modelUrl"]
    url = url.removeprefix("file://")
    path = Path(url)
    return path if path.is_absolute() else model_store(args.config, args.workdir) / path


def cmd_drift(args) -> int:
    client = connect(args)
    version = args.version
    if version is None:
        try:
            version = client.default_version(args.model)
        except (requests.RequestException, ApiError):
            if not (args.before and args.after):
                raise
            print("TorchServe unreachable: comparing all versions in the files together")

    if args.reference:
        ref_path = args.reference
    else:
        if version is None:
            raise Refused("give --reference (no server to ask which archive serves the model)")
        ref_path = archive_path(client, args, args.model, version)
    reference = load_reference(ref_path)

    if args.before:
        before, window = args.before.read_text(), f"since {args.before}"
    elif args.window:
        before = client.metrics_text()
        print(f"waiting {args.window:g} s for live traffic ...", flush=True)
        time.sleep(args.window)
        window = f"over the last {args.window:g} s"
    else:
        before, window = "", "since the server started"
    after = args.after.read_text() if args.after else client.metrics_text()
    if args.after:
        window += f" until {args.after}"

    live = drift.Snapshot.from_text(after, args.model, version).minus(drift.Snapshot.from_text(before, args.model, version))
    report = drift.compare(reference, live, min_samples=args.min_samples, warn=args.warn, alert=args.alert)
    failed = report.verdict == "ALERT" or (args.fail_on == "warn" and report.verdict == "WARN")
    if args.json:
        print(json.dumps({"model": args.model, "version": version, "reference": str(ref_path), "window": window,
                          **report.to_dict()}, indent=2))
    else:
        print(f"drift of {args.model} {version or '(all versions)'} {window}; reference {ref_path}")
        print(drift.render(report))
    return 1 if failed else 0


# --- labelled feedback ---------------------------------------------------------------
FEEDBACK_REFERENCE = REPO / "deploy" / "monitoring" / "feedback_reference.json"


def cmd_feedback(args) -> int:
    """Labelled accuracy per version (the management port's /feedback/<model>/summary) against the held-out reference."""
    summary = connect(args).feedback_summary(args.model)
    reference = feedback.load_reference(args.reference) if args.reference and args.reference.exists() else None
    rep = feedback.report(summary, reference)
    print(json.dumps(rep, indent=2) if args.json else feedback.render(rep))
    return 1 if any(v["test"]["verdict"] == "BELOW" for v in rep["versions"].values()) else 0


def cmd_export_labelled(args) -> int:
    """Every labelled answer (its canonical input), page by page from /feedback/<model>/export, as a class-per-folder tree."""
    client = connect(args)
    items, after, classes = [], 0, None
    while True:
        page = client.request("management", "GET", f"/feedback/{args.model}/export",
                              params={"after": after, "limit": 500}).json()
        items += page["items"]
        if page["next"] is None:
            break
        after = page["next"]
    if classes is None:
        classes = feedback_classes(client, args.model, items)
    counts = feedback.export_tree(items, classes, args.out, include_disputed=args.include_disputed)
    print(f"{counts['written']} labelled images written to {args.out} (one folder per class, {feedback.CLASSES_FILE}, "
          f"labels.jsonl); left out: {counts['not_a_garment']} not a garment, {counts['disputed']} disputed"
          + (f", {counts['unknown_class']} of classes the model does not have" if counts["unknown_class"] else ""))
    print(f"retrain with them: make train ADD={args.out}")
    return 0


def feedback_classes(client: TorchServeClient, model: str, items: list[dict]) -> list[str]:
    """The model's class names, in order: from its description (a describe request), else from the labels seen."""
    resp = client.request("inference", "POST", f"/predictions/{model}", data=b"{}", check=False,
                          headers={"describe": "true", "Content-Type": "application/octet-stream"})
    try:
        return list(resp.json()["classes"])
    except (ValueError, KeyError, TypeError):
        pairs = sorted({(it["class_index"], it["label"]) for it in items if it["class_index"] is not None})
        return [name for _, name in pairs]


# --- gradual rollout (the serving stack's /rollout/<model>: scripts/deploy/traffic.py) ---------------------
def rollout_call(client: TorchServeClient, method: str, model: str, doc: dict | None = None) -> dict:
    """GET or PUT /rollout/<model> on the management port; a refusal (4xx with its message) is Refused."""
    resp = client.request("management", method, f"/rollout/{model}", json=doc, check=False)
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code in (200, 202):
        return body
    ours = body.get("type") in ("BadRolloutRequest", "UnknownVersion", "RolloutConflict", "VersionNotReady")
    if resp.status_code in (403, 404) and not ours:  # a TorchServe reached directly, or not our gateway
        raise Refused("shadow, canary, promote and rollback need the serving stack (make serve): this management "
                      f"address ({client.endpoints.management}) is not its gateway")
    if 400 <= resp.status_code < 500:
        raise Refused(body.get("message") or resp.text[:300])
    raise ApiError(resp)


def format_rollout(state: dict) -> str:
    live, cand = state["live"], state.get("candidate")
    if state["mode"] == "shadow":
        what = (f"{live} answers every request; {cand} gets a mirrored copy of "
                + ("each" if state["percent"] >= 100 else f"{state['percent']:g} % of them") + " (shadow)")
    elif state["mode"] == "canary":
        what = f"{cand} answers {state['percent']:g} % of the default predictions, {live} the rest (canary)"
    else:
        what = f"{live} answers every request" + (f" (promoted; rollback returns to {state['previous']})"
                                                  if state.get("previous") else "")
    loaded = sorted({v for versions in state.get("replicas", {}).values() for v in versions})
    return f"{state['model']}: {what}; loaded on every replica: {', '.join(loaded) or '?'}"


def cmd_rollout_action(args) -> int:
    doc = {"action": args.command, "version": getattr(args, "version", None)}
    if args.command in ("canary", "shadow") and args.percent is not None:
        doc["percent"] = args.percent
    state = rollout_call(connect(args), "PUT", args.model, doc)
    print(format_rollout(state))
    return 0


def cmd_compare(args) -> int:
    client = connect(args)
    baseline = args.baseline
    if baseline is None:
        state = rollout_call(client, "GET", args.model)
        baseline = state["previous"] if state["live"] == args.version and state.get("previous") else state["live"]
    if baseline == args.version:
        raise Refused(f"{args.version} is the baseline itself; name the candidate (or --baseline)")
    doc = client.request("management", "GET", f"/feedback/{args.model}/compare",
                         params={"baseline": baseline, "candidate": args.version, "limit": args.limit}).json()
    thresholds = compare.Thresholds(min_requests=args.min_requests, min_agreement=args.min_agreement)
    rep = compare.report(doc, client.metrics_text(), thresholds)
    print(json.dumps(rep, indent=2) if args.json else compare.render(rep))
    return 1 if rep["verdict"] == "ROLLBACK" else 0


# --- CLI ----------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_connection_args(common)
    p = argparse.ArgumentParser(prog="python -m scripts.ops.ctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", parents=[common], help="models, versions, workers, queue, memory")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("scale", parents=[common], help="set min = max workers of a model version (synchronous)")
    s.add_argument("model")
    add_scale_args(s)
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("versions", parents=[common], help="the loaded versions of a model")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_versions)

    s = sub.add_parser("set-default", parents=[common], help="route /predictions/MODEL to VERSION")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--force", action="store_true", help="even when that version has no READY worker")
    s.set_defaults(func=cmd_set_default)

    s = sub.add_parser("predict", parents=[common], help="classify one or many images")
    add_predict_args(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("health", parents=[common], help="token-aware health check; exit 0 healthy, 1 not")
    s.add_argument("--model", default=None, help="only this model (default: every registered model)")
    s.set_defaults(func=cmd_health)

    s = sub.add_parser("metrics", parents=[common], help="summary of the model's prediction-quality metrics")
    s.add_argument("--model", default=MODEL)
    s.add_argument("--version", default=None, help="only this version (default: each version seen)")
    s.add_argument("--save", type=Path, default=None, help="also write the raw /metrics text here (for drift --before)")
    s.add_argument("--since", type=Path, default=None, help="subtract this saved snapshot (counts since then)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_metrics)

    s = sub.add_parser("drift", parents=[common], help="live label/confidence distributions vs the reference (PSI)")
    s.add_argument("--model", default=MODEL)
    s.add_argument("--version", default=None, help="default: the model's default version")
    s.add_argument("--window", type=float, default=None, help="snapshot, wait this many seconds, snapshot again")
    s.add_argument("--before", type=Path, default=None, help="saved /metrics text to start from (ctl metrics --save)")
    s.add_argument("--after", type=Path, default=None, help="saved /metrics text to end at (default: live now)")
    s.add_argument("--reference", type=Path, default=None,
                   help="reference.json, .mar or .pt (default: the served version's archive in the model store)")
    s.add_argument("--min-samples", type=int, default=drift.MIN_SAMPLES, help="fewer live predictions: INSUFFICIENT")
    s.add_argument("--warn", type=float, default=drift.WARN_PSI, help="PSI from which the verdict is WARN")
    s.add_argument("--alert", type=float, default=drift.ALERT_PSI, help="PSI from which the verdict is ALERT")
    s.add_argument("--fail-on", choices=("alert", "warn"), default="alert", help="verdict that makes the exit code 1")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_drift)

    s = sub.add_parser("feedback", parents=[common],
                       help="labelled accuracy per version, by flag and class, vs the held-out reference (exit 1: BELOW)")
    s.add_argument("--model", default=MODEL)
    s.add_argument("--reference", type=Path, default=FEEDBACK_REFERENCE,
                   help="held-out accuracy per flag (python -m scripts.ops.alerts writes it)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_feedback)

    s = sub.add_parser("export-labelled", parents=[common],
                       help="the labelled answers' canonical inputs as a class-per-folder tree (make train ADD=DIR)")
    s.add_argument("--model", default=MODEL)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--include-disputed", action="store_true", help="also answers whose label a later labeller disputed")
    s.set_defaults(func=cmd_export_labelled)

    for name, text in (("shadow", "mirror every default prediction to VERSION (staged: make rollout ROLLOUT_ARGS=--stage)"),
                       ("canary", "send --percent of the default predictions to VERSION"),
                       ("promote", "make VERSION the default on every replica, ending a shadow or canary"),
                       ("rollback", "end a shadow or canary; after a promote, the previous version again")):
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("model")
        if name != "rollback":
            s.add_argument("version")
        if name == "canary":
            s.add_argument("--percent", type=float, required=True, help="the candidate's share, above 0 and below 100")
        if name == "shadow":
            s.add_argument("--percent", type=float, default=None,
                           help="mirror only this share of the default predictions (default: all), to bound the cost")
        s.set_defaults(func=cmd_rollout_action)

    s = sub.add_parser("compare", parents=[common],
                       help="VERSION against the live version on the same requests: agreement, flags, confidence, "
                            "latency, labelled accuracy, verdict (exit 1: ROLLBACK)")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--baseline", default=None, help="default: the live version (the one before a promote, once promoted)")
    s.add_argument("--limit", type=int, default=100_000, help="the newest compared answers taken at most")
    s.add_argument("--min-requests", type=int, default=compare.Thresholds.min_requests,
                   help="fewer compared requests: INSUFFICIENT")
    s.add_argument("--min-agreement", type=float, default=compare.Thresholds.min_agreement,
                   help="agreement below this: REVIEW")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compare)
    return p


def run(func, args: argparse.Namespace) -> int:
    """Run a command; turn the expected failures into a message and an exit code."""
    try:
        return func(args)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except drift.CounterReset as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (requests.RequestException, OSError) as exc:
        print(f"error: TorchServe unreachable or a file unreadable: {exc}", file=sys.stderr)
        return 2


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
