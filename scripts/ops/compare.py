"""Two versions on the same requests: the comparison ``ctl compare`` prints and its verdict.

The data: every answer both the live (baseline) version and the candidate gave to the same request and image (a
shadow rollout mirrors every default prediction to the candidate; the recorder keeps both answers side by side by
request id), with the label a person gave where there is one; the handler's own stage latency per version
(``StageLatency``, per handled batch), and the shadow sink's outcomes and answer time for mirrored copies.

Checks, each with its figures (a verdict is the worst of them):

- **agreement** of the labels, against ``min_agreement`` (REVIEW below it);
- **uncertain** and **out of distribution** flags: McNemar's test on the answers where the two versions' flags
  differ; the candidate flagging significantly more (z >= ``z``) is REVIEW;
- **labelled accuracy** (answers with feedback): McNemar's test on the answers exactly one version got right; the
  candidate significantly worse is ROLLBACK;
- **shadow failures**: mirrored copies the candidate failed (5xx or no answer in time) above ``max_failures`` of
  those sent is ROLLBACK; copies the sink dropped (the candidate too slow for the traffic) above it is REVIEW;
- **latency**: the candidate's median inference time per batch above ``max_latency_ratio`` times the baseline's is
  REVIEW (judged once each version handled ``min_batches`` batches);
- fewer than ``min_requests`` compared requests: INSUFFICIENT (the figures are shown for information).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scripts.ops import drift
from scripts.ops.feedback import wilson
from scripts.ops.tsclient import parse_prometheus

VERDICTS = ("PROMOTE", "INSUFFICIENT", "REVIEW", "ROLLBACK")  # worst last
CONFIDENCE_EDGES = (0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass(frozen=True)
class Thresholds:
    min_requests: int = 200
    min_agreement: float = 0.97
    z: float = 3.09  # one-sided, 1 false alarm in 1000 comparisons
    max_failures: float = 0.01
    max_latency_ratio: float = 1.5
    min_batches: int = 100  # handled batches each version needs before its latency is judged (bucketed estimates)


def mcnemar_z(worse: int, better: int) -> float:
    """McNemar's statistic as a signed z: positive when the candidate is worse (``worse`` > ``better`` discordant)."""
    n = worse + better
    return (worse - better) / math.sqrt(n) if n else 0.0


def quantiles(values: list[float], qs=(0.1, 0.5, 0.9)) -> dict[str, float | None]:
    """Exact quantiles (linear interpolation between order statistics)."""
    out: dict[str, float | None] = {}
    data = sorted(values)
    for q in qs:
        if not data:
            out[f"p{round(q * 100)}"] = None
            continue
        pos = q * (len(data) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{round(q * 100)}"] = round(data[lo] + (data[hi] - data[lo]) * (pos - lo), 6)
    return out


def side(answers: list[dict], truths: list[str | None]) -> dict:
    n = len(answers)
    conf = [a["confidence"] for a in answers]
    labelled = [(a, t) for a, t in zip(answers, truths) if t is not None]
    right = sum(a["label"] == t for a, t in labelled)
    bins, low = {}, 0.0
    for edge in CONFIDENCE_EDGES:
        bins[f"({low:g}, {edge:g}]"] = sum(low < c <= edge for c in conf)
        low = edge
    return {
        "answers": n,
        "uncertain": sum(a["uncertain"] for a in answers), "uncertain_share": round(sum(a["uncertain"] for a in answers) / n, 6) if n else None,
        "ood": sum(a["ood"] for a in answers), "ood_share": round(sum(a["ood"] for a in answers) / n, 6) if n else None,
        "confidence": {"mean": round(sum(conf) / n, 6) if n else None, **quantiles(conf), "bins": bins},
        "labelled": {"n": len(labelled), "correct": right, "accuracy": round(right / len(labelled), 6) if labelled else None,
                     "interval": wilson(right, len(labelled))},
    }


def stage_latency(metrics_text: str, model: str, version: str) -> dict:
    """The handler's StageLatency per stage for one version (per handled batch), p50/p90 in ms and the batches."""
    snap = drift.Snapshot.from_text(metrics_text, model, version)
    out = {}
    for stage, hist in sorted(snap.latency.items()):
        batches = hist[max(hist)] if hist else 0
        if batches:
            out[stage] = {"p50_ms": _ms(drift.quantile(hist, 0.5)), "p90_ms": _ms(drift.quantile(hist, 0.9)),
                          "batches": int(batches)}
    return out


def shadow_figures(metrics_text: str, model: str, version: str) -> dict:
    """The shadow sink's outcomes for copies mirrored to ``version``, and their answer time (p50/p90 in ms)."""
    outcomes: dict[str, float] = {}
    hist: dict[float, float] = {}
    for name, labels, value in parse_prometheus(metrics_text):
        if labels.get("ModelName") != model or labels.get("ModelVersion") != version:
            continue
        if name == "shadow_requests_total":
            outcomes[labels["outcome"]] = outcomes.get(labels["outcome"], 0) + value
        elif name == "shadow_latency_seconds_bucket":
            le = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            hist[le] = hist.get(le, 0) + value
    out = {k: int(v) for k, v in sorted(outcomes.items())}
    if hist and hist.get(max(hist)):
        out["latency_p50_ms"] = _ms(drift.quantile(hist, 0.5))
        out["latency_p90_ms"] = _ms(drift.quantile(hist, 0.9))
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def report(doc: dict, metrics_text: str = "", thresholds: Thresholds = Thresholds()) -> dict:
    """``doc``: the recorder's /feedback/<model>/compare answer; ``metrics_text``: the gateway's /metrics."""
    t = thresholds
    model, base_v, cand_v = doc["model"], doc["baseline"], doc["candidate"]
    pairs = doc["pairs"]
    base = [{k: p[k] for k in ("label", "confidence", "uncertain", "ood")} for p in pairs]
    cand = [p["candidate"] for p in pairs]
    truths = [p.get("truth") for p in pairs]
    n = len(pairs)
    agreeing = sum(b["label"] == c["label"] for b, c in zip(base, cand))
    requests = len({p["request_id"] for p in pairs})
    out = {
        "model": model, "baseline": base_v, "candidate": cand_v,
        "requests": requests, "answers": n, "agreeing": agreeing,
        "agreement": round(agreeing / n, 6) if n else None, "agreement_interval": wilson(agreeing, n),
        "recorded": doc.get("recorded", {}), "paired_in_store": doc.get("paired", n),
        "versions": {base_v: side(base, truths), cand_v: side(cand, truths)},
        "latency": {base_v: stage_latency(metrics_text, model, base_v), cand_v: stage_latency(metrics_text, model, cand_v)},
        "shadow": shadow_figures(metrics_text, model, cand_v),
        "disagreements": _confusions(base, cand),
    }
    checks = []

    def check(name: str, verdict: str, text: str) -> None:
        checks.append({"check": name, "verdict": verdict, "reason": text})

    if out["agreement"] is not None:
        ok = out["agreement"] >= t.min_agreement
        check("agreement", "PROMOTE" if ok else "REVIEW",
              f"labels agree on {agreeing} of {n} answers ({out['agreement']:.2%}); "
              f"{'at least' if ok else 'below'} {t.min_agreement:.0%}")
    for key, what in (("uncertain", "uncertain"), ("ood", "out of distribution")):
        worse = sum(c[key] and not b[key] for b, c in zip(base, cand))
        better = sum(b[key] and not c[key] for b, c in zip(base, cand))
        z = mcnemar_z(worse, better)
        flagged = "REVIEW" if z >= t.z else "PROMOTE"
        check(key, flagged, f"{what}: baseline {sum(b[key] for b in base)}, candidate {sum(c[key] for c in cand)} of {n} "
                            f"(only the candidate {worse}, only the baseline {better}; McNemar z {z:.2f}"
                            f"{', significantly more' if flagged == 'REVIEW' else ''})")
    labelled = [(b, c, tr) for b, c, tr in zip(base, cand, truths) if tr is not None]
    if labelled:
        worse = sum(b["label"] == tr and c["label"] != tr for b, c, tr in labelled)
        better = sum(c["label"] == tr and b["label"] != tr for b, c, tr in labelled)
        z = mcnemar_z(worse, better)
        acc_b = out["versions"][base_v]["labelled"]["accuracy"]
        acc_c = out["versions"][cand_v]["labelled"]["accuracy"]
        check("labelled accuracy", "ROLLBACK" if z >= t.z else "PROMOTE",
              f"on {len(labelled)} labelled answers: baseline {acc_b:.2%}, candidate {acc_c:.2%} (only the baseline right "
              f"{worse}, only the candidate right {better}; McNemar z {z:.2f}"
              f"{', significantly worse' if z >= t.z else ''})")
    else:
        check("labelled accuracy", "PROMOTE", "no labelled answer among the compared ones (label some: the Review tab, "
                                              "POST /feedback/<model>)")
    shadow = out["shadow"]
    sent = sum(shadow.get(k, 0) for k in ("answered", "rejected", "failed"))
    if sent or shadow.get("dropped"):
        failed, dropped = shadow.get("failed", 0), shadow.get("dropped", 0)
        check("shadow failures", "ROLLBACK" if sent and failed / sent > t.max_failures else "PROMOTE",
              f"the candidate failed {failed} of {sent} mirrored requests (limit {t.max_failures:.0%})")
        offered = sent + dropped
        if dropped / offered > t.max_failures:
            check("shadow drops", "REVIEW", f"the sink dropped {dropped} of {offered} copies ({dropped / offered:.1%}): the "
                                            "candidate did not keep up; the comparison covers the others")
    inf_b, inf_c = (out["latency"][v].get("inference", {}) for v in (base_v, cand_v))
    lat_b, lat_c = inf_b.get("p50_ms"), inf_c.get("p50_ms")
    if lat_b and lat_c and min(inf_b["batches"], inf_c["batches"]) >= t.min_batches:
        ratio = lat_c / lat_b
        check("latency", "REVIEW" if ratio > t.max_latency_ratio else "PROMOTE",
              f"median inference time per batch: baseline {lat_b:g} ms, candidate {lat_c:g} ms ({ratio:.2f}x; limit "
              f"{t.max_latency_ratio:g}x)")
    verdict = max((c["verdict"] for c in checks), key=VERDICTS.index, default="PROMOTE")
    if requests < t.min_requests and verdict != "ROLLBACK":
        verdict = "INSUFFICIENT"
        checks.append({"check": "requests", "verdict": "INSUFFICIENT",
                       "reason": f"{requests} requests compared; at least {t.min_requests} are needed for a verdict"})
    out["checks"] = checks
    out["verdict"] = verdict
    out["reasons"] = [c["reason"] for c in checks if c["verdict"] == verdict] or [c["reason"] for c in checks]
    return out


def _confusions(base: list[dict], cand: list[dict], top: int = 5) -> list[dict]:
    counts: dict[tuple[str, str], int] = {}
    for b, c in zip(base, cand):
        if b["label"] != c["label"]:
            counts[(b["label"], c["label"])] = counts.get((b["label"], c["label"]), 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"baseline": b, "candidate": c, "answers": k} for (b, c), k in ranked]


def render(rep: dict) -> str:
    b, c = rep["baseline"], rep["candidate"]
    lines = [f"{rep['model']}: {c} (candidate) against {b} (baseline) on the same requests",
             f"requests compared: {rep['requests']} ({rep['answers']} answers); recorded: "
             + ", ".join(f"{v} {k}" for v, k in rep["recorded"].items())]
    if rep["agreement"] is not None:
        lo, hi = rep["agreement_interval"]
        lines.append(f"agreement: {rep['agreement']:.2%} ({rep['agreeing']} of {rep['answers']}; 95 % {lo:.2%}-{hi:.2%})")
    lines.append(f"  {'':<24}{b:>16}{c:>16}")

    def row(name, fn):
        lines.append(f"  {name:<24}{fn(rep['versions'][b]):>16}{fn(rep['versions'][c]):>16}")

    pct = lambda x: "-" if x is None else f"{x:.2%}"  # noqa: E731
    num = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    row("uncertain", lambda s: pct(s["uncertain_share"]))
    row("out of distribution", lambda s: pct(s["ood_share"]))
    row("confidence mean", lambda s: num(s["confidence"]["mean"]))
    row("confidence p10/p50/p90", lambda s: "/".join("-" if s["confidence"][q] is None else f"{s['confidence'][q]:.2f}"
                                                      for q in ("p10", "p50", "p90")))
    row("labelled accuracy", lambda s: f"{pct(s['labelled']['accuracy'])} (n={s['labelled']['n']})")
    for stage in ("preprocess", "inference", "postprocess"):
        vals = [rep["latency"][v].get(stage) for v in (b, c)]
        if any(vals):
            lines.append(f"  {stage + ' p50/p90 ms':<24}" + "".join(
                f"{('-' if x is None else str(x['p50_ms']) + '/' + str(x['p90_ms'])):>16}" for x in vals))
    if rep["shadow"]:
        lines.append("  shadow copies: " + ", ".join(f"{k} {v}" for k, v in rep["shadow"].items()))
    if rep["disagreements"]:
        lines.append("  most frequent disagreements: " + ", ".join(
            f"{d['baseline']} -> {d['candidate']} ({d['answers']})" for d in rep["disagreements"]))
    for chk in rep["checks"]:
        lines.append(f"  {chk['verdict']:<12} {chk['check']}: {chk['reason']}")
    lines.append(f"verdict: {rep['verdict']}")
    return "\n".join(lines)
