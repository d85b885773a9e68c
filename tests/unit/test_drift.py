"""Drift math without a server: PSI, rebinning, histogram quantiles, snapshot deltas, verdicts.

Live snapshots are written in the exact Prometheus text TorchServe 0.12 serves on
/metrics (one line per label set, cumulative ``le`` buckets, a trailing comma in
the label list, a Hostname label added by the frontend).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from handler.loader import read_model
from scripts.ops import drift

BUCKETS = drift.DEFAULT_BUCKETS


@pytest.fixture(scope="module")
def reference(served_model_path) -> dict:
    return read_model(served_model_path).reference


def prom_text(labels: Counter, confidences, *, version: str = "1.0", model: str = "fashion_cnn",
              rejected: dict | None = None, uncertain: int = 0, ood: int = 0) -> str:
    """/metrics text as TorchServe writes it for our handler's metrics."""
    dims = f'ModelName="{model}",ModelVersion="{version}"'
    lines = ["# HELP PredictionsPerLabel Torchserve prometheus counter metric with unit: Count",
             "# TYPE PredictionsPerLabel counter"]
    lines += [f'PredictionsPerLabel{{{dims},Label="{label}",Hostname="vm",}} {float(n)}' for label, n in labels.items()]
    lines += ["# TYPE TopConfidence histogram"]
    for le in BUCKETS:
        count = sum(1 for c in confidences if c <= le)
        le_text = "+Inf" if math.isinf(le) else repr(le)
        lines.append(f'TopConfidence_bucket{{{dims},Hostname="vm",le="{le_text}",}} {float(count)}')
    lines.append(f'TopConfidence_count{{{dims},Hostname="vm",}} {float(len(confidences))}')
    lines.append(f'TopConfidence_sum{{{dims},Hostname="vm",}} {float(sum(confidences))}')
    if uncertain:
        lines.append(f'UncertainPredictions{{{dims},Hostname="vm",}} {float(uncertain)}')
    if ood:
        lines.append(f'OutOfDistributionPredictions{{{dims},Hostname="vm",}} {float(ood)}')
    for reason, n in (rejected or {}).items():
        lines.append(f'RejectedRequests{{{dims},Reason="{reason}",Hostname="vm",}} {float(n)}')
    lines.append('Requests2XX{Level="Host",Hostname="vm",} 11.0')
    return "\n".join(lines) + "\n"


def draw_like_reference(reference: dict, n: int, seed: int) -> tuple[Counter, list[float]]:
    """n predictions drawn like the held-out split: labels by its shares, confidences bootstrapped."""
    rng = np.random.default_rng(seed)
    classes = list(reference["label_distribution"])
    p = np.array([reference["label_distribution"][c] for c in classes])
    labels = Counter(rng.choice(classes, size=n, p=p / p.sum()).tolist())
    confidences = rng.choice(reference["confidences"], size=n, replace=True).tolist()
    return labels, confidences


def ood_like_reference(reference: dict, n: int, seed: int) -> int:
    """How many of n predictions drawn like the held-out split are flagged out of distribution."""
    return int(np.random.default_rng(seed + 1000).binomial(n, reference.get("ood_rate") or 0.0))


def live(labels: Counter, confidences, **kw) -> drift.Snapshot:
    return drift.Snapshot.from_text(prom_text(labels, confidences, **kw), "fashion_cnn", kw.get("version", "1.0"))


# --- the math -------------------------------------------------------------------------
def test_psi_is_zero_for_identical_shares_and_matches_the_formula():
    assert drift.psi([10, 20, 70], [10, 20, 70])[0] == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([10, 20, 70], [20, 40, 140])[0] < 1e-3  # same shares; only the smoothing differs
    e, a = [50, 50], [80, 20]
    es, as_ = drift.shares(e), drift.shares(a)
    by_hand = sum((x - y) * math.log(x / y) for x, y in zip(as_, es))
    total, terms = drift.psi(e, a)
    assert total == pytest.approx(by_hand) and total == pytest.approx(sum(terms))
    assert total > 0.25  # an 80/20 split against 50/50 is a major shift
    assert drift.psi(e, a)[0] == pytest.approx(drift.psi(a, e)[0])  # PSI is symmetric


def test_bins_empty_on_both_sides_are_dropped_but_a_new_bin_counts():
    assert drift.psi([0, 50, 50], [0, 50, 50])[0] == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([0, 50, 50], [0, 50, 50])[1][0] == 0.0
    shifted, terms = drift.psi([0, 50, 50], [60, 20, 20])
    assert shifted > drift.ALERT_PSI and terms[0] > 0


def test_levels_follow_the_documented_thresholds():
    assert [drift.level(v) for v in (0.0, 0.099, 0.1, 0.249, 0.25, 3.0)] == ["OK", "OK", "WARN", "WARN", "ALERT", "ALERT"]


def test_rebin_counts_values_up_to_and_including_each_bound():
    edges = [0.25, 0.5, 0.75, 1.0, math.inf]
    assert drift.rebin([0.1, 0.25, 0.26, 0.5, 0.99, 1.0, 1.5], edges) == [2, 2, 0, 2, 1]


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    hist = {0.005: 0.0, 0.01: 4.0, 0.025: 8.0, math.inf: 8.0}
    assert drift.quantile(hist, 0.5) == pytest.approx(0.01)  # rank 4 = top of (0.005, 0.01]
    assert drift.quantile(hist, 0.75) == pytest.approx(0.01 + 0.015 * 0.5)  # rank 6: halfway through (0.01, 0.025]
    assert drift.quantile({0.1: 1.0, math.inf: 4.0}, 0.9) == 0.1  # in +Inf: the highest finite bound
    assert drift.quantile({}, 0.5) is None and drift.quantile({math.inf: 0.0}, 0.5) is None


# --- snapshots ---------------------------------------------------------------------------
def test_snapshot_reads_our_metrics_for_one_version_and_subtracts():
    text1 = prom_text(Counter({"Ankle boot": 2, "Coat": 1}), [0.9, 0.95, 0.4], rejected={"unsupported_format": 1}, uncertain=1)
    text2 = prom_text(Counter({"Ankle boot": 5, "Coat": 1, "Bag": 2}), [0.9, 0.95, 0.4, 0.8, 0.8, 0.3, 0.99, 0.97],
                      rejected={"unsupported_format": 1, "too_large": 2}, uncertain=2)
    other = prom_text(Counter({"Trouser": 7}), [0.9] * 7, version="2.0")
    before = drift.Snapshot.from_text(text1 + other, "fashion_cnn", "1.0")
    after = drift.Snapshot.from_text(text2 + other, "fashion_cnn", "1.0")
    assert before.labels == {"Ankle boot": 2.0, "Coat": 1.0} and before.versions == {"1.0"}
    assert before.confidence[0.5] == 1.0 and before.confidence[math.inf] == 3.0
    delta = after.minus(before)
    assert {k: v for k, v in delta.labels.items() if v} == {"Ankle boot": 3.0, "Bag": 2.0}
    assert delta.predictions == 5 and delta.uncertain == 1
    assert {k: v for k, v in delta.rejected.items() if v} == {"too_large": 2.0}
    assert [c for _, _, c in drift.bin_counts(delta.confidence) if c] == [1.0, 4.0]  # 0.3 | 0.8, 0.8, 0.99, 0.97
    both = drift.Snapshot.from_text(text2 + other, "fashion_cnn")
    assert both.labels["Trouser"] == 7 and both.versions == {"1.0", "2.0"}
    assert drift.Snapshot.from_text(text2, "another_model").predictions == 0


def test_a_counter_going_down_means_a_restart_and_is_refused():
    before = live(Counter({"Coat": 5}), [0.9] * 5)
    after = live(Counter({"Coat": 2}), [0.9] * 2)
    with pytest.raises(drift.CounterReset, match="restarted"):
        after.minus(before)


# --- verdicts -----------------------------------------------------------------------------
def test_a_stream_drawn_like_the_held_out_split_is_ok(reference):
    for seed in range(20):  # not one lucky draw: every one of 20 windows of 1000 predictions
        ood = ood_like_reference(reference, 1000, seed)
        report = drift.compare(reference, live(*draw_like_reference(reference, 1000, seed), ood=ood))
        assert report.verdict == "OK", (seed, report.labels.psi, report.confidence.psi, [p.psi for p in report.parts])
        assert report.labels.psi < drift.WARN_PSI and report.confidence.psi < drift.WARN_PSI


def test_the_held_out_true_labels_are_not_drift(reference, holdout):
    """The split's real class shares (not the model's predictions) are within noise of the reference."""
    _, labels = holdout
    names = list(reference["label_distribution"])
    counts = Counter(names[i] for i in labels.tolist())
    ood = round(len(labels) * (reference.get("ood_rate") or 0.0))
    report = drift.compare(reference, live(counts, reference["confidences"], ood=ood), min_samples=len(labels))
    assert report.verdict == "OK" and report.labels.psi < 0.02


def test_a_stream_full_of_non_garments_raises_the_alarm_through_the_ood_share(reference):
    assert reference["ood_rate"] is not None
    labels, confidences = draw_like_reference(reference, 1000, 3)
    report = drift.compare(reference, live(labels, confidences, ood=400))
    assert report.ood is not None and report.ood.verdict == "ALERT" and report.verdict == "ALERT"
    assert "out_of_distribution" in report.to_dict() and "out_of_distribution: PSI" in drift.render(report)


def test_a_stream_of_one_class_raises_the_alarm(reference):
    _, confidences = draw_like_reference(reference, 300, seed=1)
    report = drift.compare(reference, live(Counter({"Ankle boot": 300}), confidences))
    assert report.alarm and report.verdict == "ALERT" and report.labels.verdict == "ALERT"
    assert report.confidence.verdict == "OK"  # the confidences alone were drawn like the reference
    top = max(zip(report.labels.terms, report.labels.bins))
    assert top[1] == "Ankle boot"  # the report points at the class that moved


def test_low_confidence_alone_raises_the_alarm(reference):
    labels, _ = draw_like_reference(reference, 400, seed=2)
    rng = np.random.default_rng(2)
    report = drift.compare(reference, live(labels, rng.uniform(0.2, 0.6, size=400).tolist()))
    assert report.labels.verdict == "OK" and report.confidence.verdict == "ALERT" and report.alarm


def test_a_moderate_shift_warns(reference):
    """Three quarters of the trousers predicted as bags instead: visible, below ALERT."""
    labels, confidences = draw_like_reference(reference, 4000, seed=3)
    moved = labels["Trouser"] * 3 // 4
    labels["Trouser"] -= moved
    labels["Bag"] += moved
    report = drift.compare(reference, live(labels, confidences))
    assert report.verdict == "WARN", report.labels.psi


def test_too_few_predictions_give_no_verdict(reference):
    report = drift.compare(reference, live(Counter({"Ankle boot": 50}), [0.99] * 50))
    assert report.labels.psi > drift.ALERT_PSI  # the number is shown ...
    assert report.verdict == "INSUFFICIENT" and not report.alarm  # ... but 50 predictions decide nothing
    assert "INSUFFICIENT" in drift.render(report)
    assert drift.compare(reference, live(Counter({"Ankle boot": 50}), [0.99] * 50), min_samples=50).alarm


def test_an_empty_window_is_insufficient_not_an_error(reference):
    report = drift.compare(reference, drift.Snapshot())
    assert report.verdict == "INSUFFICIENT" and report.n_live == 0


def test_reference_confidences_are_rebinned_to_the_served_buckets(reference):
    report = drift.compare(reference, live(*draw_like_reference(reference, 500, seed=4)))
    assert sum(report.confidence.reference) == len(reference["confidences"])
    # 10 classes: a top-1 probability is >= 0.1, so only the (0.1, 1] buckets can hold anything
    assert all(b.startswith(("(0.1,", "(0.25,", "(0.5,", "(0.75,")) for b in report.confidence.bins)
    as_dict = report.to_dict()
    assert as_dict["verdict"] == report.verdict and len(as_dict["labels"]["bins"]) == 10
