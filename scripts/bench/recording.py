"""What recording every answer costs: ``make bench-recording`` (also run by ``make bench``).

Two serving stacks as ``make serve`` starts them (gateway, 1 replica, supervisor), one with recording on (the
default: every answer spooled by the worker, ingested into the SQLite store by the recorder beside it) and one
with it off (``serve run --no-record``), loaded in turn, round by round, with ``hey`` at concurrency 16 on loopback
with the same image. The recorder's own CPU (ingesting while the load runs) counts against recording, as it
shares the cores. After the rounds, the answers in the store are compared with the 200s ``hey`` counted: every
answer is there exactly once.

The 1-minute load average is recorded with each round. Writes docs/benchmarks_recording.json and the "Recording"
section of docs/benchmarks.md. Target (issue 23): requests/s with recording on >= 0.95x off.
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

import psutil

from scripts.bench.gateway import GatewayTarget
from scripts.bench.protocols import hey_load
from scripts.bench.report import replace_section
from scripts.bench.run import ensure_hey, machine
from scripts.deploy.harness import REPO

BODY = REPO / "examples" / "coat.png"
DOCS = REPO / "docs"
MODEL = "fashion_cnn"
START, END = "<!-- recording-bench:start -->", "<!-- recording-bench:end -->"
TARGET = 0.95


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of load per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", type=Path, default=DOCS / "benchmarks_recording.json")
    p.add_argument("--markdown", type=Path, default=DOCS / "benchmarks.md",
                   help="the file whose recording section is rewritten")
    return p


def recorder_cpu_s(target: GatewayTarget) -> float:
    pid = target.stack.recorder.pid() if target.stack.recorder else None
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def recorded(target: GatewayTarget) -> int:
    summary = target.client.feedback_summary(MODEL)
    return sum(v["recorded"] for v in summary["versions"].values())


def run(args) -> dict:
    ensure_hey()
    rounds: dict[str, list[dict]] = {"recording on": [], "recording off": []}
    with tempfile.TemporaryDirectory(prefix="bench-recording-") as tmp:
        root = Path(tmp)
        on = GatewayTarget(root / "on", 1, MODEL, REPO / "model_store", "fashion_cnn.mar")
        off = GatewayTarget(root / "off", 1, MODEL, REPO / "model_store", "fashion_cnn.mar")
        off.opts.record = False
        targets = {"recording on": on, "recording off": off}
        started = []
        try:
            for t in targets.values():
                started.append(t.start())
            time.sleep(2)
            before = recorded(on)  # the start's own checks (readiness answers are not recorded)
            served_on = 0
            for i in range(args.rounds):
                order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
                for name, target in order:
                    cpu = recorder_cpu_s(target)
                    result = hey_load(target, f"/predictions/{MODEL}", BODY, {}, args.concurrency, args.seconds)
                    result["load1"] = round(os.getloadavg()[0], 2)
                    result["recorder_cpu_ms_per_request"] = round(
                        (recorder_cpu_s(target) - cpu) * 1000 / max(1, result["responses"]), 3)
                    rounds[name].append(result)
                    if name == "recording on":
                        served_on += result["status"].get(200, 0)
                    print(f"{name}: {result['requests_per_s']:.1f} req/s, p50 {result['p50_ms']} ms "
                          f"(load1 {result['load1']})", flush=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and recorded(on) - before < served_on:  # the recorder's last pass
                time.sleep(0.5)
            in_store = recorded(on) - before
        finally:
            for t in reversed(started):
                t.stop()
    summary = {}
    for name, res in rounds.items():
        total, seconds = sum(r["responses"] for r in res), sum(r["total_s"] for r in res)
        summary[name] = {"requests_per_s": round(total / seconds, 1),
                         "p50_ms": round(statistics.median(r["p50_ms"] for r in res), 1),
                         "p99_ms": round(statistics.median(r["p99_ms"] for r in res), 1),
                         "failed": sum(r["error_count"] for r in res), "responses": total,
                         "load1": [r["load1"] for r in res]}
    ratios = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(rounds["recording on"], rounds["recording off"])]
    cpu = [r["recorder_cpu_ms_per_request"] for r in rounds["recording on"]]
    return {"command": "make bench-recording", "argv": sys.argv[1:], "concurrency": args.concurrency,
            "seconds_per_round": args.seconds, "rounds": args.rounds, "image": BODY.name, "machine": machine(),
            "load_avg_end": [round(v, 2) for v in os.getloadavg()], "summary": summary,
            "ratio_per_round": [round(x, 3) for x in ratios], "ratio_median": round(statistics.median(ratios), 3),
            "ratio_overall": round(summary["recording on"]["requests_per_s"] / summary["recording off"]["requests_per_s"], 3),
            "recorder_cpu_ms_per_request": cpu, "answered_with_recording": served_on, "recorded_in_store": in_store,
            "raw": rounds}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [START, "## Recording every answer",
             "",
             f"`{report['command']}` ({report['rounds']} alternating rounds of {report['seconds_per_round']:g} s each, "
             f"`hey -c {report['concurrency']}`, {report['image']} as an octet-stream body, through the gateway with "
             f"1 replica, loopback; {report['machine']['nproc']} cores, {report['machine']['cpu_model']}): the same "
             "stack with recording on (the default: the worker spools each answer, the recorder ingests it into "
             "SQLite on the same cores) and off (`serve run --no-record`). Raw rounds: "
             "[benchmarks_recording.json](benchmarks_recording.json).",
             "",
             "| recording | requests/s | p50 ms | p99 ms | failed | load1 per round |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in s.items():
        lines.append(f"| {name.split()[-1]} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['failed']} | {', '.join(map(str, row['load1']))} |")
    ratio = report["ratio_median"]
    cpu = report["recorder_cpu_ms_per_request"]
    lines += ["",
              f"- Requests/s with recording on: {ratio:.3f}x off, the median of the rounds "
              f"({', '.join(f'{x:.3f}' for x in report['ratio_per_round'])}; over the whole run "
              f"{report['ratio_overall']:.3f}x): {'meets' if ratio >= TARGET else 'misses'} the {TARGET}x target.",
              f"- The recorder used {min(cpu):.2f}-{max(cpu):.2f} ms of CPU per answer while the load ran (ingesting "
              "the spool into SQLite), on the cores the workers use.",
              f"- Every answer recorded: {report['recorded_in_store']} answers in the store for the "
              f"{report['answered_with_recording']} 200s of the recording rounds.",
              END]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    report = run(args)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    replace_section(args.markdown, section)
    print(section)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
