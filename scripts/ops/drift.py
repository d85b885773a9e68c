"""Drift math, with no server: Prometheus snapshots -> live distributions -> PSI against the reference.

The handler counts, per model version, every answered image's label
(``PredictionsPerLabel``) and top-1 confidence (``TopConfidence``, a histogram
with Prometheus' default buckets, cumulative ``le`` counts). Two snapshots of
``/metrics`` give what was served between them (``Snapshot.minus``); the
training-time reference (``reference.json`` in the model and the archive) gives
the held-out split's predicted-label shares and its sorted top-1 confidences,
which ``rebin`` puts into the same buckets.

Population stability index, over bins i with shares e_i (reference) and a_i (live):

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

Counts are smoothed with ``alpha`` = 0.5 per bin before taking shares (so an empty
bin is finite), and bins empty on both sides are dropped. Verdict thresholds are
the usual ones: PSI < 0.1 OK (no significant shift), 0.1 <= PSI < 0.25 WARN
(moderate shift: look), PSI >= 0.25 ALERT (major shift: act). The overall
verdict is the worse of the label and confidence verdicts.

PSI of a small sample is mostly sampling noise: for 10 labels, n live predictions
drawn exactly like the reference give PSI of about 9/n on average (n = 100: mean
0.09, 1 in 1000 windows above 0.25; n = 200: mean 0.04, 99.9th percentile 0.14).
Below ``min_samples`` (default 200) the verdict is INSUFFICIENT, whatever the PSI.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from scripts.ops.tsclient import parse_prometheus

WARN_PSI = 0.1
ALERT_PSI = 0.25
MIN_SAMPLES = 200
ALPHA = 0.5
# Prometheus client default buckets: what TorchServe gives every histogram.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)
LEVELS = ("OK", "WARN", "ALERT")

Histogram = dict[float, float]  # upper bound (le, inf last) -> cumulative count
# The handler's metrics (handler/metrics.py) as they appear on /metrics.
OURS = frozenset({"PredictionsPerLabel", "TopConfidence_bucket", "UncertainPredictions", "TTADisagreement",
                  "OutOfDistributionPredictions",
                  "RejectedRequests", "StageLatency_bucket"})


# --- snapshots of /metrics ----------------------------------------------------
@dataclass
class Snapshot:
    """Our model metrics for one model (one version, or all versions summed), from one /metrics text."""

    labels: dict[str, float] = field(default_factory=dict)  # PredictionsPerLabel
    confidence: Histogram = field(default_factory=dict)  # TopConfidence buckets
    uncertain: float = 0.0  # UncertainPredictions
    disagreement: float = 0.0  # TTADisagreement
    ood: float = 0.0  # OutOfDistributionPredictions
    rejected: dict[str, float] = field(default_factory=dict)  # RejectedRequests by Reason
    latency: dict[str, Histogram] = field(default_factory=dict)  # StageLatency buckets by Stage
    versions: set[str] = field(default_factory=set)  # ModelVersion values seen

    @property
    def predictions(self) -> float:
        return sum(self.labels.values())

    @classmethod
    def from_text(cls, text: str, model: str, version: str | None = None) -> Snapshot:
        snap = cls()
        latency: dict[str, Histogram] = defaultdict(dict)
        for name, labels, value in parse_prometheus(text):
            if labels.get("ModelName") != model:
                continue
            if name not in OURS or (version is not None and labels.get("ModelVersion") != version):
                continue
            snap.versions.add(labels.get("ModelVersion", ""))
            if name == "PredictionsPerLabel":
                _add(snap.labels, labels["Label"], value)
            elif name == "TopConfidence_bucket":
                _add(snap.confidence, _le(labels["le"]), value)
            elif name == "UncertainPredictions":
                snap.uncertain += value
            elif name == "TTADisagreement":
                snap.disagreement += value
            elif name == "OutOfDistributionPredictions":
                snap.ood += value
            elif name == "RejectedRequests":
                _add(snap.rejected, labels["Reason"], value)
            elif name == "StageLatency_bucket":
                _add(latency[labels["Stage"]], _le(labels["le"]), value)
        snap.latency = dict(latency)
        return snap

    def minus(self, earlier: Snapshot) -> Snapshot:
        """What was counted between ``earlier`` and this snapshot (same server, no restart)."""
        out = Snapshot(
            labels=_sub(self.labels, earlier.labels, "PredictionsPerLabel"),
            confidence=_sub(self.confidence, earlier.confidence, "TopConfidence"),
            uncertain=_sub({"": self.uncertain}, {"": earlier.uncertain}, "UncertainPredictions")[""],
            disagreement=_sub({"": self.disagreement}, {"": earlier.disagreement}, "TTADisagreement")[""],
            ood=_sub({"": self.ood}, {"": earlier.ood}, "OutOfDistributionPredictions")[""],
            rejected=_sub(self.rejected, earlier.rejected, "RejectedRequests"),
            latency={stage: _sub(h, earlier.latency.get(stage, {}), "StageLatency") for stage, h in self.latency.items()},
            versions=self.versions | earlier.versions,
        )
        return out


class CounterReset(ValueError):
    """A counter went down between snapshots: the server restarted in between."""


def _le(text: str) -> float:
    return math.inf if text in ("+Inf", "Inf", "inf") else float(text)


def _add(d: dict, key, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


def _sub(now: Mapping, before: Mapping, what: str) -> dict:
    out = {}
    for key in set(now) | set(before):
        delta = now.get(key, 0.0) - before.get(key, 0.0)
        if delta < -1e-9:
            raise CounterReset(f"{what}[{key}] went from {before.get(key, 0.0):g} to {now.get(key, 0.0):g}: "
                               "the server restarted between the snapshots; take a new window")
        out[key] = max(delta, 0.0)
    return out


# --- histograms ---------------------------------------------------------------
def bin_counts(hist: Histogram) -> list[tuple[float, float, float]]:
    """Cumulative buckets -> [(lower, upper, count)] per bucket, in order."""
    out, lower, previous = [], 0.0, 0.0
    for upper in sorted(hist):
        cumulative = hist[upper]
        out.append((lower, upper, max(cumulative - previous, 0.0)))
        lower, previous = upper, cumulative
    return out


def quantile(hist: Histogram, q: float) -> float | None:
    """Estimate the q-quantile from cumulative buckets, as Prometheus' histogram_quantile does.

    Linear within the bucket that holds the rank; a rank in the +Inf bucket gives the
    highest finite bound. None when the histogram is empty.
    """
    if not hist:
        return None
    total = hist[max(hist)]
    if total <= 0:
        return None
    rank = q * total
    for lower, upper, count in bin_counts(hist):
        below = hist[upper] - count
        if hist[upper] >= rank and count > 0:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / count
    return None


def rebin(values: Iterable[float], edges: Sequence[float]) -> list[float]:
    """Count ``values`` into buckets with upper bounds ``edges`` (value <= le, as Prometheus does)."""
    edges = sorted(edges)
    counts = [0.0] * len(edges)
    for v in values:
        for i, upper in enumerate(edges):
            if v <= upper:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    return counts


# --- PSI ----------------------------------------------------------------------
def shares(counts: Sequence[float], alpha: float = ALPHA) -> list[float]:
    total = sum(counts) + alpha * len(counts)
    return [(c + alpha) / total for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float], alpha: float = ALPHA) -> tuple[float, list[float]]:
    """PSI between two count vectors over the same bins -> (total, per-bin terms).

    Bins empty on both sides are dropped (their term is reported as 0).
    """
    if len(expected) != len(actual):
        raise ValueError("expected and actual must have the same bins")
    keep = [i for i, (e, a) in enumerate(zip(expected, actual)) if e > 0 or a > 0]
    if not keep:
        return 0.0, [0.0] * len(expected)
    e = shares([expected[i] for i in keep], alpha)
    a = shares([actual[i] for i in keep], alpha)
    terms = [0.0] * len(expected)
    for i, ei, ai in zip(keep, e, a):
        terms[i] = (ai - ei) * math.log(ai / ei)
    return sum(terms), terms


def level(value: float, warn: float = WARN_PSI, alert: float = ALERT_PSI) -> str:
    return "ALERT" if value >= alert else "WARN" if value >= warn else "OK"


# --- comparison with the reference ---------------------------------------------
@dataclass
class Part:
    """One compared distribution: bins, reference and live counts, PSI."""

    name: str
    bins: list[str]
    reference: list[float]
    live: list[float]
    psi: float
    terms: list[float]
    verdict: str


@dataclass
class DriftReport:
    n_live: float
    n_reference: int
    labels: Part
    confidence: Part
    verdict: str  # OK / WARN / ALERT / INSUFFICIENT
    min_samples: int
    warn: float
    alert: float
    ood: Part | None = None  # out-of-distribution answers vs the held-out rate (models with a detector)

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.labels, self.confidence) + ((self.ood,) if self.ood else ())

    @property
    def alarm(self) -> bool:
        return self.verdict == "ALERT"

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict, "n_live": self.n_live, "n_reference": self.n_reference,
            "min_samples": self.min_samples, "thresholds": {"warn": self.warn, "alert": self.alert},
            **{part.name: {"psi": round(part.psi, 6), "verdict": part.verdict,
                           "bins": [{"bin": b, "reference_share": round(r / max(sum(part.reference), 1), 6),
                                     "live_share": round(v / max(sum(part.live), 1), 6), "live": v, "psi_term": round(t, 6)}
                                    for b, r, v, t in zip(part.bins, part.reference, part.live, part.terms)]}
               for part in self.parts},
        }


def reference_label_counts(reference: Mapping, classes: Sequence[str]) -> list[float]:
    """The reference's predicted-label shares as counts over its ``n`` held-out images."""
    dist = reference["label_distribution"]
    n = reference.get("n") or len(reference.get("confidences", ())) or 1
    return [float(dist.get(c, 0.0)) * n for c in classes]


def compare(reference: Mapping, live: Snapshot, *, min_samples: int = MIN_SAMPLES,
            warn: float = WARN_PSI, alert: float = ALERT_PSI) -> DriftReport:
    """Live labels and confidences (a Snapshot delta) against the training-time reference."""
    classes = list(reference["label_distribution"])
    classes += sorted(set(live.labels) - set(classes))  # a label the reference never saw still counts
    ref_labels = reference_label_counts(reference, classes)
    live_labels = [live.labels.get(c, 0.0) for c in classes]
    label_psi, label_terms = psi(ref_labels, live_labels)

    edges = sorted(live.confidence) or list(DEFAULT_BUCKETS)
    ref_conf = rebin(reference["confidences"], edges)
    live_conf = [count for _, _, count in bin_counts(live.confidence)] if live.confidence else [0.0] * len(edges)
    conf_psi, conf_terms = psi(ref_conf, live_conf)
    keep = [i for i, (r, v) in enumerate(zip(ref_conf, live_conf)) if r > 0 or v > 0]
    lowers = [0.0, *edges[:-1]]
    conf_bins = [f"({lowers[i]:g}, {edges[i]:g}]" for i in keep]

    labels = Part("labels", classes, ref_labels, live_labels, label_psi, label_terms, level(label_psi, warn, alert))
    confidence = Part("confidence", conf_bins, [ref_conf[i] for i in keep], [live_conf[i] for i in keep],
                      conf_psi, [conf_terms[i] for i in keep], level(conf_psi, warn, alert))
    n_live = live.predictions
    n_ref = int(reference.get("n") or len(reference["confidences"]))
    ood = None
    if reference.get("ood_rate") is not None:  # the share of answers flagged out of distribution
        ref_ood = [n_ref * (1 - reference["ood_rate"]), n_ref * reference["ood_rate"]]
        live_ood = [max(n_live - live.ood, 0.0), live.ood]
        ood_psi, ood_terms = psi(ref_ood, live_ood)
        ood = Part("out_of_distribution", ["in distribution", "out of distribution"], ref_ood, live_ood, ood_psi,
                   ood_terms, level(ood_psi, warn, alert))
    if n_live < min_samples:
        verdict = "INSUFFICIENT"
    else:
        verdict = max((p.verdict for p in (labels, confidence, ood) if p), key=LEVELS.index)
    return DriftReport(n_live, n_ref, labels, confidence, verdict, min_samples, warn, alert, ood)


def render(report: DriftReport) -> str:
    """A human-readable report: per-bin shares, PSI terms, verdicts."""
    lines = [f"live predictions: {report.n_live:g}   reference: {report.n_reference} held-out images"]
    for part in report.parts:
        ref_total, live_total = max(sum(part.reference), 1e-12), max(sum(part.live), 1e-12)
        lines.append(f"\n{part.name}: PSI {part.psi:.4f} -> {part.verdict}")
        lines.append(f"  {'bin':<14} {'reference':>9} {'live':>9} {'count':>7} {'PSI term':>9}")
        for b, r, v, t in zip(part.bins, part.reference, part.live, part.terms):
            lines.append(f"  {b:<14} {r / ref_total:>9.3f} {v / live_total:>9.3f} {v:>7g} {t:>9.4f}")
    lines.append(f"\nthresholds: PSI < {report.warn:g} OK, < {report.alert:g} WARN, otherwise ALERT; "
                 f"at least {report.min_samples} live predictions needed for a verdict")
    if report.verdict == "INSUFFICIENT":
        lines.append(f"verdict: INSUFFICIENT ({report.n_live:g} < {report.min_samples} live predictions; "
                     f"PSI of so few is mostly sampling noise)")
    else:
        lines.append(f"verdict: {report.verdict}")
    return "\n".join(lines)
