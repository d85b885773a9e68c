"""What a shadow rollout costs clients: ``make bench-shadow``.

One serving stack as ``make serve`` starts it (gateway, 1 replica, supervisor, recorder, shadow sink) with fashion_cnn
1.0 and a candidate 2.0 (the same model and shipped config) loaded beside it. Rounds alternate the shadow off and on
(``PUT /rollout/fashion_cnn`` on the management port, what ``ctl shadow`` / ``ctl rollback`` send), each loaded with
``hey`` on loopback with the same image, at concurrency 1 and 16. With the shadow on, every default prediction is
also answered by 2.0 on the same cores (the sink forwards each mirrored copy at once), so what is measured is the
whole cost: nginx's mirror, the sink, the candidate's forward pass and its recording.

The 1-minute load average is recorded with each round. Writes docs/benchmarks_shadow.json and the "Shadow" section
of docs/benchmarks.md. Target (issue 24): median latency with the shadow on within 10 % of off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.drive import GatewayTarget
from scripts.bench.protocols import hey_load
from scripts.bench.report import replace_section
from scripts.bench.run import ensure_hey, machine
from scripts.deploy.harness import REPO, V2_ARCHIVE, build_store
from scripts.ops.compare import shadow_figures
from scripts.ops.tsclient import parse_prometheus

BODY = REPO / "examples" / "coat.png"
DOCS = REPO / "docs"
MODEL = "fashion_cnn"
START, END = "<!-- shadow-bench:start -->", "<!-- shadow-bench:end -->"
TARGET = 1.10


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of load per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and setting")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--json", type=Path, default=DOCS / "benchmarks_shadow.json")
    p.add_argument("--markdown", type=Path, default=DOCS / "benchmarks.md",
                   help="the file whose shadow section is rewritten")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from --json, without running")
    return p


SETTINGS = {"off": None, "on": 100.0, "on 25 %": 25.0}  # the shadow's share of the default predictions


def set_shadow(target: GatewayTarget, percent: float | None) -> None:
    state = target.client.request("management", "GET", f"/rollout/{MODEL}").json()
    if state["mode"] != "off":
        target.client.request("management", "PUT", f"/rollout/{MODEL}", json={"action": "rollback"})
    if percent is not None:
        target.client.request("management", "PUT", f"/rollout/{MODEL}",
                              json={"action": "shadow", "version": "2.0", "percent": percent})


def wait_drained(target: GatewayTarget, timeout: float = 60.0) -> None:
    """Until the sink has sent every copy of the previous round (a round measures its own setting only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        depth = [v for name, _, v in parse_prometheus(target.client.metrics_text()) if name == "shadow_queue_depth"]
        if not depth or depth[0] == 0:
            time.sleep(1.0)  # the copies being sent
            return
        time.sleep(0.5)


def run(args) -> dict:
    ensure_hey()
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        root = Path(tmp)
        store = build_store(root / "model_store", [{}, {**V2_ARCHIVE, "archive_name": "fashion_cnn_v2.0"}])
        target = GatewayTarget(root / "stack", 1, MODEL, store, "fashion_cnn.mar,fashion_cnn_v2.0.mar")
        target.start()
        try:
            time.sleep(2)
            for concurrency in args.concurrency:
                for i in range(args.rounds):
                    for setting in (list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))):
                        set_shadow(target, SETTINGS[setting])
                        wait_drained(target)
                        before = shadow_figures(target.client.metrics_text(), MODEL, "2.0")
                        result = hey_load(target, f"/predictions/{MODEL}", BODY, {}, concurrency, args.seconds)
                        after = shadow_figures(target.client.metrics_text(), MODEL, "2.0")
                        result["load1"] = round(os.getloadavg()[0], 2)
                        result["shadow"] = {k: after.get(k, 0) - before.get(k, 0)
                                            for k in ("answered", "rejected", "failed", "dropped")}
                        name = f"c{concurrency} shadow {setting}"
                        rounds.setdefault(name, []).append(result)
                        print(f"{name}: {result['requests_per_s']:.1f} req/s, p50 {result['p50_ms']} ms, p99 "
                              f"{result['p99_ms']} ms, shadow {result['shadow']} (load1 {result['load1']})", flush=True)
            set_shadow(target, None)
        finally:
            target.stop()
    summary = {}
    for name, res in rounds.items():
        total, seconds = sum(r["responses"] for r in res), sum(r["total_s"] for r in res)
        summary[name] = {"requests_per_s": round(total / seconds, 1),
                         "p50_ms": round(statistics.median(r["p50_ms"] for r in res), 1),
                         "p99_ms": round(statistics.median(r["p99_ms"] for r in res), 1),
                         "failed": sum(r["error_count"] for r in res), "responses": total,
                         "shadow": {k: sum(r["shadow"][k] for r in res) for k in res[0]["shadow"]},
                         "load1": [r["load1"] for r in res]}
    ratios = {f"c{c} {setting}": round(summary[f"c{c} shadow {setting}"]["p50_ms"] / summary[f"c{c} shadow off"]["p50_ms"], 3)
              for c in args.concurrency for setting in SETTINGS if setting != "off"}
    return {"command": "make bench-shadow", "argv": sys.argv[1:], "concurrency": args.concurrency,
            "seconds_per_round": args.seconds, "rounds": args.rounds, "image": BODY.name, "machine": machine(),
            "load_avg_end": [round(v, 2) for v in os.getloadavg()], "summary": summary, "p50_ratio": ratios,
            "raw": rounds}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [START, "## Shadow rollout", "",
             f"`{report['command']}` ({report['rounds']} alternating rounds of {report['seconds_per_round']:g} s per "
             f"setting and concurrency, `hey`, {report['image']} as an octet-stream body, through the gateway with 1 "
             f"replica, loopback; {report['machine']['nproc']} cores, {report['machine']['cpu_model']}): fashion_cnn 1.0 "
             "answering, with 2.0 (the same model) loaded beside it, the shadow off and on (`ctl shadow`: every "
             "default prediction mirrored and answered by 2.0 on the same cores). Raw rounds: "
             "[benchmarks_shadow.json](benchmarks_shadow.json).", "",
             "| concurrency | shadow | requests/s | p50 ms | p99 ms | failed | copies answered / dropped | load1 per round |",
             "|---:|---|---:|---:|---:|---:|---|---|"]
    for name, row in s.items():
        c, _, setting = name.partition(" shadow ")
        lines.append(f"| {c[1:]} | {setting} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['failed']} | {row['shadow']['answered']} / {row['shadow']['dropped']} | "
                     f"{', '.join(map(str, row['load1']))} |")
    lines.append("")
    for key, ratio in report["p50_ratio"].items():
        c, _, setting = key.partition(" ")
        lines.append(f"- Concurrency {c[1:]}, shadow {setting}: median latency {ratio:.3f}x the shadow off: "
                     f"{'meets' if ratio <= TARGET else 'misses'} the target (within 10 %).")
    rates = {name: round(sum(r["shadow"]["answered"] for r in report["raw"][name])
                         / sum(r["total_s"] for r in report["raw"][name]), 1)
             for name in s if " shadow on" in name}
    lines += ["- Copies the candidate answered per second: " + ", ".join(f"{rate} ({name})" for name, rate in rates.items())
              + ". Where the candidate cannot keep up, the sink drops the rest (counted); clients never wait for it. "
              "What the shadow costs clients is the candidate's own work (a second forward pass and its recording) on "
              "the same two cores as the live version, so a share at or above what the candidate can absorb costs about "
              "the same; a smaller `ctl shadow --percent N`, or cores of its own, costs less. A frozen or killed candidate "
              "costs clients nothing (tests/integration/test_canary.py).", END]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    if args.render_only:  # the section again from the recorded figures (no load)
        report = json.loads(args.json.read_text())
    else:
        report = run(args)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    replace_section(args.markdown, section)
    print(section)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
