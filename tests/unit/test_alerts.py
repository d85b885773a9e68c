"""deploy/monitoring/: generated from one source, valid for promtool, alerts fire as ctl drift judges.

promtool comes with Debian's ``prometheus`` package (scripts/setup_env.sh installs it);
the promtool tests are skipped, with that reason, where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.ops import alerts, ctl, drift

REPO = Path(__file__).resolve().parents[2]
MON = REPO / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                                             "prometheus; scripts/setup_env.sh does it)")


@pytest.fixture(scope="module")
def source() -> alerts.Source:
    return alerts.load_source()


@pytest.fixture(scope="module")
def mon(source) -> alerts.Monitoring:
    return alerts.build(source)


def promtool(*argv: str, cwd: Path = MON) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


# --- one source ---------------------------------------------------------------------------
def test_regenerating_gives_the_committed_files():
    args = alerts.get_args_parser().parse_args([])
    files = alerts.generate(args)
    assert {p.relative_to(REPO).as_posix() for p in files} == {
        "deploy/monitoring/prometheus.yml", "deploy/monitoring/recording_rules.yml",
        "deploy/monitoring/alerting_rules.yml", "deploy/monitoring/grafana-dashboard.json",
        "deploy/monitoring/tests/alerts_test.yml", "deploy/monitoring/tests/feedback_alerts_test.yml",
        "deploy/monitoring/feedback_reference.json", "docs/operations.md"}
    stale = [str(p.relative_to(REPO)) for p, text in files.items() if p.read_text() != text]
    assert not stale, f"out of date (run python -m scripts.ops.alerts and commit): {stale}"
    assert alerts.main(alerts.get_args_parser().parse_args(["--check"])) == 0


def test_thresholds_are_derived_from_the_reference_and_drift_levels(source, mon):
    rules = yaml.safe_load((MON / "alerting_rules.yml").read_text())["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules}
    assert f">= {drift.ALERT_PSI:g} and" in by_name["PredictionDrift"]["expr"]
    assert f">= {drift.WARN_PSI:g} and" in by_name["PredictionDriftWarning"]["expr"]
    assert all(f">= {drift.MIN_SAMPLES}" in by_name[n]["expr"] for n in
               ("PredictionDrift", "PredictionDriftWarning", "OneClassDominates", "MeanConfidenceLow",
                "UncertainRateHigh", "OutOfDistributionRateHigh"))
    ref = source.reference
    # the reference's own numbers as constants in the recording rules
    recorded = (MON / "recording_rules.yml").read_text()
    for label, share in ref["label_distribution"].items():
        assert f"vector({share:.6g})" in recorded, label
    # another reference gives other thresholds: nothing is typed in by hand
    other = dict(ref, uncertain_rate=ref["uncertain_rate"] / 2, ood_rate=ref["ood_rate"] * 2,
                 label_distribution={**ref["label_distribution"]})
    other_mon = alerts.build(alerts.Source(source.model, source.classes, other, source.response_timeout_s,
                                           source.target, source.origin))
    assert other_mon.derived.uncertain_max < mon.derived.uncertain_max
    assert other_mon.derived.ood_max > mon.derived.ood_max
    # the bounds are reference + z standard errors at MIN_SAMPLES
    u = ref["uncertain_rate"]
    assert mon.derived.uncertain_max == pytest.approx(u + 4 * (u * (1 - u) / drift.MIN_SAMPLES) ** 0.5)
    # the dominance share makes PSI = ALERT_PSI on its own
    for label, e in mon.derived.label_share.items():
        a = mon.derived.dominance[label]
        psi = (a - e) * __import__("math").log(a / e) + (e - a) * __import__("math").log((1 - a) / (1 - e))
        assert psi == pytest.approx(drift.ALERT_PSI, abs=1e-6)


def test_every_alert_has_a_summary_and_a_runbook_anchor_in_the_docs(mon):
    docs = (REPO / "docs" / "operations.md").read_text()
    rules = yaml.safe_load((MON / "alerting_rules.yml").read_text())["groups"][0]["rules"]
    assert len(rules) == len(mon.alerts) >= 14
    for rule in rules:
        ann = rule["annotations"]
        assert len(ann["summary"]) > 40 and rule["labels"]["severity"] in ("warning", "critical")
        anchor = ann["runbook_url"].split("#", 1)[1]
        assert ann["runbook_url"].startswith("docs/operations.md#") and ann["runbook"].startswith(ann["runbook_url"])
        assert f"#### {rule['alert']}" in docs and anchor == rule["alert"].lower()
        assert f"| [{rule['alert']}](#{anchor}) |" in docs  # the table row


def test_the_dashboard_shows_the_recorded_series_with_the_alerts_thresholds(mon):
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    recorded = {r["record"] for g in yaml.safe_load((MON / "recording_rules.yml").read_text())["groups"]
                for r in g["rules"]}
    assert dash["__inputs"][0]["pluginId"] == "prometheus" and dash["uid"]
    lines = set()
    for panel in dash["panels"]:
        if panel["type"] != "timeseries":
            continue
        for target in panel["targets"]:
            assert target["expr"] in recorded or target["expr"].startswith("gateway_"), target["expr"]
        lines |= {s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None}
    d = mon.derived
    for value in (drift.WARN_PSI, drift.ALERT_PSI, d.mean_conf_min, d.uncertain_max, d.ood_max, d.p99_budget_s,
                  mon.policy.error_ratio, mon.policy.rejection_ratio):
        assert value in lines, value
    # and each of those numbers is the alert's (same constant, same formatting)
    exprs = " ".join(a.expr for a in mon.alerts)
    for value in (d.mean_conf_min, d.uncertain_max, d.ood_max, d.p99_budget_s):
        assert alerts.num(value) in exprs


# --- promtool ------------------------------------------------------------------------------
@needs_promtool
def test_promtool_checks_config_and_rules(mon):
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", "recording_rules.yml", "alerting_rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(mon.alerts)} rules found" in rules.stdout


@needs_promtool
def test_promtool_unit_tests_fire_and_stay_silent_as_expected(mon):
    result = promtool("test", "rules", "tests/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = yaml.safe_load((MON / "tests" / "alerts_test.yml").read_text())
    names = {t["name"]: {c["alertname"] for c in t["alert_rule_test"] if c["exp_alerts"]} for t in doc["tests"]}
    assert names["held-out-like traffic: nothing fires"] == set()
    assert {"PredictionDrift", "OneClassDominates"} <= names["one class only: drift and dominance"]
    assert names["one class but too few predictions: no verdict"] == set()
    assert "PredictionDriftWarning" in names["moderate shift: a warning, no dominance"]
    assert "OutOfDistributionRateHigh" in names["half the inputs out of distribution"]
    assert len(names["service faults"]) == 8 and "GatewayErrorBurst" in names["service faults"]
    assert names["answers not recorded, the store down"] == {"RecordingLost", "FeedbackStoreDown"}
    # every alert is asserted in every scenario: silent ones with exp_alerts: []
    assert all(len(t["alert_rule_test"]) == len(mon.alerts) for t in doc["tests"])


@needs_promtool
def test_the_labelled_accuracy_alert_fires_exactly_when_ctl_feedbacks_test_says_below(mon):
    """Label streams over the 6h window on both sides of the threshold: LabelledAccuracyLow fires where
    scripts/ops/feedback.py's test (which ctl feedback runs) says BELOW, and stays silent for held-out-like labels,
    a not-significant shortfall and too few labels."""
    result = promtool("test", "rules", "tests/feedback_alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = yaml.safe_load((MON / "tests" / "feedback_alerts_test.yml").read_text())
    fired = {t["name"]: {c["alertname"] for c in t["alert_rule_test"] if c["exp_alerts"]} for t in doc["tests"]}
    verdicts = {name: alerts.feedback_verdict(mon, stream)["verdict"] for name, stream in alerts.label_streams(mon).items()}
    assert sorted(verdicts.values()) == ["BELOW", "BELOW", "INSUFFICIENT", "OK", "OK"]
    for name, verdict in verdicts.items():
        assert fired[name] == ({"LabelledAccuracyLow"} if verdict == "BELOW" else set()), (name, verdict)
    z = {name: alerts.feedback_verdict(mon, s)["z"] for name, s in alerts.label_streams(mon).items()}
    assert any(mon.policy.feedback_z - 1 < v < mon.policy.feedback_z for v in z.values())  # close calls, both sides
    assert any(mon.policy.feedback_z < v < mon.policy.feedback_z + 1 for v in z.values())


def test_the_feedback_reference_is_the_served_models_held_out_accuracy_per_flag(source):
    ref = source.feedback_reference
    assert ref["n"] == 701 and ref["precision"] == "int8"
    assert sum(f["n"] for f in ref["by_flag"].values()) == ref["n"]
    assert sum(f["correct"] for f in ref["by_flag"].values()) == ref["correct"]
    flags = ref["by_flag"]
    assert flags["confident"]["accuracy"] > ref["accuracy"] > flags["uncertain"]["accuracy"]
    # the served int8 model's gated-TTA accuracy (README: 90.58 %)
    assert abs(ref["accuracy"] - 0.9058) < 0.002
    assert json.loads((MON / "feedback_reference.json").read_text()) == ref


@needs_promtool
def test_promtool_catches_a_wrong_expectation(mon, tmp_path):
    """The harness can fail: claiming that held-out traffic fires PredictionDrift must fail promtool."""
    like = alerts.stream_like_reference(mon)
    wrong = alerts.Scenario("wrong", alerts.stream_series(mon, like, 30) + alerts.service_series(mon, 30),
                            [("PredictionDrift", {"ModelName": mon.source.model, "ModelVersion": "1.0", "part": "labels"})])
    path = _write_tests(mon, tmp_path, [wrong])
    result = promtool("test", "rules", str(path), cwd=tmp_path)
    assert result.returncode != 0 and "PredictionDrift" in result.stdout + result.stderr


# --- ctl drift and the alerts agree --------------------------------------------------------
def _write_tests(mon, tmp_path: Path, scenario_list, names=None) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "recording_rules.yml").write_text(alerts.recording_rules(mon))
    (tmp_path / "rules" / "alerting_rules.yml").write_text(alerts.alerting_rules(mon))
    path = tmp_path / "rules" / "tests" / "t.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(alerts.promtool_tests(mon, scenario_list=scenario_list, alert_names=names))
    return path


def _metrics_text(mon, snap: drift.Snapshot) -> str:
    """A /metrics text as the gateway serves it (replica label, TorchServe's trailing commas)."""
    base = f'replica="0",ModelName="{mon.source.model}",ModelVersion="1.0",Hostname="vm",'
    lines = [f'PredictionsPerLabel{{{base}Label="{label}",}} {count!r}' for label, count in snap.labels.items()]
    for upper, cumulative in sorted(snap.confidence.items()):
        le = "+Inf" if upper == float("inf") else repr(float(upper))
        lines.append(f'TopConfidence_bucket{{{base}le="{le}",}} {cumulative!r}')
    lines.append(f"OutOfDistributionPredictions{{{base}}} {snap.ood!r}")
    lines.append(f"UncertainPredictions{{{base}}} {snap.uncertain!r}")
    return "\n".join(lines) + "\n"


def _mix(a: alerts.Stream, b: alerts.Stream, t: float) -> alerts.Stream:
    keys = set(a.conf_bins) | set(b.conf_bins)
    return alerts.Stream({c: (1 - t) * a.labels.get(c, 0) + t * b.labels.get(c, 0) for c in a.labels},
                         {k: (1 - t) * a.conf_bins.get(k, 0) + t * b.conf_bins.get(k, 0) for k in keys},
                         (1 - t) * a.mean_conf + t * b.mean_conf, (1 - t) * a.uncertain + t * b.uncertain,
                         (1 - t) * a.ood + t * b.ood)


def _streams(mon) -> dict[str, alerts.Stream]:
    d = mon.derived
    like = alerts.stream_like_reference(mon)
    top = list(d.label_share)[-1]
    one = alerts.Stream({c: (60.0 if c == top else 0.0) for c in d.label_share}, {d.conf_bins[-1][0]: 60.0}, 0.98)
    low = alerts.Stream(dict(like.labels), {d.conf_bins[1][0]: 30.0, d.conf_bins[2][0]: 30.0}, 0.5, 45.0, like.ood)
    ood = alerts.Stream(dict(like.labels), dict(like.conf_bins), like.mean_conf, like.uncertain, 0.0)
    out = {"held-out-like": like}
    for t in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0):
        out[f"one class x{t}"] = _mix(like, one, t)
    for t in (0.1, 0.25, 0.5):
        out[f"low confidence x{t}"] = _mix(like, low, t)
    for share in (0.0, 0.06, 0.12, 0.3):
        out[f"ood {share}"] = alerts.Stream(dict(ood.labels), dict(ood.conf_bins), ood.mean_conf, ood.uncertain,
                                            share * ood.total)
    out["too few"] = alerts.Stream({c: r / 10 for c, r in one.labels.items()}, {k: r / 10 for k, r in one.conf_bins.items()},
                                   0.98)
    return out


@needs_promtool
def test_ctl_drift_and_the_alerts_give_the_same_verdict_for_the_same_stream(mon, tmp_path, capsys):
    """Each stream: ctl drift reads two /metrics snapshots 10 minutes apart; promtool feeds the same counters to the
    rules and must see PredictionDrift for exactly ctl's ALERT parts, PredictionDriftWarning for its WARN, else neither."""
    (tmp_path / "reference.json").write_text(json.dumps(mon.source.reference))
    window = alerts._duration_minutes(mon.timing.window)
    eval_min = 25
    scenario_list, verdicts = [], {}
    for name, stream in _streams(mon).items():
        before, after = tmp_path / f"{name}.0.prom", tmp_path / f"{name}.1.prom"
        before.write_text(_metrics_text(mon, alerts.snapshot(stream, eval_min - window)))
        after.write_text(_metrics_text(mon, alerts.snapshot(stream, eval_min)))
        capsys.readouterr()
        code = ctl.main(["drift", "--before", str(before), "--after", str(after), "--version", "1.0",
                         "--reference", str(tmp_path / "reference.json"), "--json",
                         "--config", str(REPO / "config.properties"), "--workdir", str(tmp_path)])
        out = capsys.readouterr().out
        report = json.loads(out[out.index("{"):])
        verdicts[name] = report["verdict"]
        assert code == (1 if report["verdict"] == "ALERT" else 0)
        base = {"ModelName": mon.source.model, "ModelVersion": "1.0"}
        parts = [p for p in ("labels", "confidence", "out_of_distribution") if report.get(p, {}).get("verdict") == "ALERT"]
        if report["verdict"] == "ALERT":
            expected = [("PredictionDrift", {**base, "part": p}) for p in parts]
        elif report["verdict"] == "WARN":
            expected = [("PredictionDriftWarning", base)]
        else:
            expected = []
        # same expectations as the generator derives from drift.compare on the stream
        assert sorted(map(repr, expected)) == sorted(map(repr, alerts.drift_expectations(mon, stream, window)))
        scenario_list.append(alerts.Scenario(name, alerts.stream_series(mon, stream, 30) + alerts.service_series(mon, 30),
                                             expected))
    assert {"OK", "WARN", "ALERT", "INSUFFICIENT"} <= set(verdicts.values()), verdicts
    path = _write_tests(mon, tmp_path, scenario_list, names=("PredictionDrift", "PredictionDriftWarning"))
    result = promtool("test", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, f"verdicts {verdicts}\n" + result.stdout[-4000:] + result.stderr[-2000:]


def test_docs_table_lists_every_alert_with_its_source(mon):
    table = alerts.docs_table(mon)
    rows = [line for line in table.splitlines() if re.match(r"^\| \[\w+\]", line)]
    assert len(rows) == len(mon.alerts)
    assert all(row.count(" | ") >= 4 for row in rows)
    assert "drift.ALERT_PSI" in table and "reference `uncertain_rate`" in table and "responseTimeout" in table
