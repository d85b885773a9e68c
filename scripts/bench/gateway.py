"""What the gateway costs and what replicas buy: ``make bench-gateway``.

Drives ``hey`` at concurrency 16 on loopback against

- the shipped model on one TorchServe reached directly (token auth on, octet-stream body),
- the same through the gateway with 1 replica and with 2 replicas,
- the no-op handler directly and through the gateway (1 replica): the gateway's own
  overhead, with no model work to hide it.

Scenarios alternate round by round so a machine whose load drifts shifts all of them
alike; the 1-minute load average is recorded with each round. Writes
docs/benchmarks_gateway.json and the "Gateway and replicas" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from scripts.bench.drive import (
    SHIPPED_CONFIG,
    GatewayTarget,
    archive,
    derive_config,
    ensure_hey,
    hey,
    machine,
    start_server,
)
from scripts.bench.report import replace_section
from scripts.deploy.harness import REPO

BODY = REPO / "examples" / "coat.png"
DOCS = REPO / "docs"
START, END = "<!-- gateway-bench:start -->", "<!-- gateway-bench:end -->"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of load per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", type=Path, default=DOCS / "benchmarks_gateway.json")
    p.add_argument("--markdown", type=Path, default=DOCS / "benchmarks.md",
                   help="the file whose gateway section is rewritten")
    return p


@contextmanager
def targets(root: Path):
    noop_store = root / "noop_store"
    noop_store.mkdir(parents=True)
    noop_config = derive_config(root / "noop-config.yaml")
    archive("noop", "noop", noop_store, noop_config)
    started = []
    try:
        direct = start_server(root / "direct", [{"kind": "ours", "name": "fashion_cnn", "config": SHIPPED_CONFIG,
                                                 "model": REPO / "models" / "fashion_cnn.pt"}])
        started.append(direct)
        direct_noop = start_server(root / "direct_noop", [{"kind": "noop", "name": "noop", "config": noop_config}])
        started.append(direct_noop)
        store = REPO / "model_store"
        one = GatewayTarget(root / "gw1", 1, "fashion_cnn", store, "fashion_cnn.mar").start()
        started.append(one)
        two = GatewayTarget(root / "gw2", 2, "fashion_cnn", store, "fashion_cnn.mar").start()
        started.append(two)
        gw_noop = GatewayTarget(root / "gw_noop", 1, "noop", noop_store, "noop.mar").start()
        started.append(gw_noop)
        yield {
            ("fashion_cnn", "direct (1 TorchServe)"): direct,
            ("fashion_cnn", "gateway, 1 replica"): one,
            ("fashion_cnn", "gateway, 2 replicas"): two,
            ("noop", "direct (1 TorchServe)"): direct_noop,
            ("noop", "gateway, 1 replica"): gw_noop,
        }
    finally:
        for target in reversed(started):
            target.stop()


def run(args) -> dict:
    ensure_hey()
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, targets(Path(tmp)) as all_targets:
        plan = [(r, key) for r in range(args.rounds) for key in all_targets]
        for _round, (model, where) in tqdm(plan, desc="gateway bench", unit="round"):
            target = all_targets[(model, where)]
            result = hey(target, model, BODY, "application/octet-stream", {}, args.concurrency, args.seconds)
            result["load1"] = round(os.getloadavg()[0], 2)
            rounds.setdefault(f"{model} | {where}", []).append(result)
    summary = {}
    for key, res in rounds.items():
        total = sum(r["responses"] for r in res)
        seconds = sum(r["total_s"] for r in res)
        summary[key] = {
            "requests_per_s": round(total / seconds, 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in res), 1),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in res), 1),
            "non_200": sum(r["error_count"] for r in res),
            "responses": total,
            "load1": [r["load1"] for r in res],
        }
    return {"command": "make bench-gateway", "argv": sys.argv[1:], "concurrency": args.concurrency,
            "seconds_per_round": args.seconds, "rounds": args.rounds, "machine": machine(), "summary": summary,
            "raw": rounds}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [START, "## Gateway and replicas",
             "",
             f"`{report['command']}` ({report['rounds']} alternating rounds of {report['seconds_per_round']:g} s each, "
             f"`hey -c {report['concurrency']}`, coat.png as an octet-stream body, loopback; "
             f"{report['machine']['nproc']} cores, {report['machine']['cpu_model']}). Raw rounds: "
             "[benchmarks_gateway.json](benchmarks_gateway.json).",
             "",
             "| handler | path | requests/s | p50 ms | p99 ms | failed | load1 per round |",
             "|---|---|---:|---:|---:|---:|---|"]
    for key, row in s.items():
        model, where = key.split(" | ")
        lines.append(f"| {model} | {where} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['non_200']} | {', '.join(map(str, row['load1']))} |")

    def ratio(a, b, field="requests_per_s"):
        return s[a][field] / s[b][field] if s.get(a) and s.get(b) and s[b][field] else float("nan")

    d, g1, g2 = "fashion_cnn | direct (1 TorchServe)", "fashion_cnn | gateway, 1 replica", "fashion_cnn | gateway, 2 replicas"
    nd, ng = "noop | direct (1 TorchServe)", "noop | gateway, 1 replica"
    overhead_ms = s[ng]["p50_ms"] - s[nd]["p50_ms"] if s.get(ng) and s.get(nd) else float("nan")
    lines += ["",
              f"- Through the gateway with one replica the model serves {ratio(g1, d):.2f}x the requests/s of "
              f"TorchServe reached directly (p99 {s[g1]['p99_ms']} vs {s[d]['p99_ms']} ms).",
              f"- Two replicas serve {ratio(g2, g1):.2f}x one replica's requests/s on this {report['machine']['nproc']}-core "
              "machine: both replicas' workers share the same cores, so a second replica buys fault tolerance "
              "(see the fault tests), not throughput, here. On a machine with more cores than one replica's "
              "workers use, replicas add throughput.",
              f"- The gateway's own cost, measured with the no-op handler (no model work to hide it): "
              f"{ratio(ng, nd):.2f}x the requests/s of direct, p50 {overhead_ms:+.1f} ms "
              f"({s[ng]['p50_ms']} vs {s[nd]['p50_ms']} ms).",
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
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        sys.exit("nginx is not installed: make install installs it")
    main(get_args_parser().parse_args())
