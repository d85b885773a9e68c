"""The gradual rollout's parts that need no server: the store's side-by-side answers, ``ctl compare``'s report and
verdict, the hops' split and mirror configuration (checked by nginx itself), and the rollout requests' validation.
The whole flow runs against the real stack in tests/integration/test_canary.py."""

from __future__ import annotations

import pytest

from scripts.deploy import store as st
from scripts.deploy import traffic
from scripts.deploy.gateway import HopSettings, ReplicaRoute, TrafficSplit, render_hop
from scripts.ops import compare
from tests.feedback_helpers import answer_line, model_line
from tests.unit.test_gateway_config import needs_nginx, nginx_accepts

MODEL = "fashion_cnn"


@pytest.fixture
def store(tmp_path):
    s = st.Store(str(tmp_path / "feedback.sqlite3"))
    yield s
    s.close()


def test_the_store_pairs_both_versions_answers_by_request_id(store):
    lines = [model_line(), model_line(version="2.0")]
    for i in range(10):
        lines.append(answer_line(f"r{i}", "Coat", uncertain=i == 0))
        if i < 8:  # the shadow answered 8 of them, and disagreed on two
            lines.append(answer_line(f"r{i}", "Shirt" if i in (3, 4) else "Coat", version="2.0", uncertain=i in (0, 1)))
    lines.append(answer_line("only-2", "Bag", version="2.0"))
    store.ingest("seg", 1, lines)
    store.label(MODEL, [st.Label("r3", 0, "Shirt")])
    doc = store.compare(MODEL, "1.0", "2.0")
    assert doc["paired"] == len(doc["pairs"]) == 8 and doc["recorded"] == {"1.0": 10, "2.0": 9}
    by_id = {p["request_id"]: p for p in doc["pairs"]}
    assert by_id["r3"]["label"] == "Coat" and by_id["r3"]["candidate"]["label"] == "Shirt" and by_id["r3"]["truth"] == "Shirt"
    assert by_id["r1"]["uncertain"] is False and by_id["r1"]["candidate"]["uncertain"] is True
    counts = store.compare_counts(MODEL, "1.0", "2.0")
    assert counts == {"paired": 8, "agreeing": 6, "uncertain_live": 1, "uncertain_candidate": 2, "ood_live": 0,
                      "ood_candidate": 0}
    rep = compare.report(doc, "", compare.Thresholds(min_requests=5))
    assert rep["requests"] == 8 and rep["agreeing"] == 6 and rep["agreement"] == 0.75
    assert rep["verdict"] == "REVIEW" and any("labels agree on 6 of 8" in r for r in rep["reasons"])
    assert rep["versions"]["2.0"]["labelled"] == {"n": 1, "correct": 1, "accuracy": 1.0, "interval": [0.2065, 1.0]}
    assert rep["disagreements"] == [{"baseline": "Coat", "candidate": "Shirt", "answers": 2}]


def pairs(n: int, *, disagree: int = 0, cand_uncertain: int = 0, truth_wrong_candidate: int = 0, labelled: int = 0) -> dict:
    """``n`` single-image requests; the candidate disagrees on the first ``disagree``, marks the first
    ``cand_uncertain`` uncertain, and the first ``labelled`` are labelled with the baseline's label."""
    out = []
    for i in range(n):
        cand_label = "Shirt" if i < max(disagree, truth_wrong_candidate) else "Coat"
        out.append({"request_id": f"r{i}", "item": 0, "time": 0.0, "label": "Coat", "confidence": 0.9,
                    "uncertain": False, "ood": False,
                    "candidate": {"label": cand_label, "confidence": 0.8, "uncertain": i < cand_uncertain, "ood": False},
                    "truth": "Coat" if i < labelled else None})
    return {"model": MODEL, "baseline": "1.0", "candidate": "2.0", "paired": n, "recorded": {"1.0": n, "2.0": n},
            "pairs": out}


def test_the_verdict_follows_the_checks():
    assert compare.report(pairs(500))["verdict"] == "PROMOTE"
    assert compare.report(pairs(100))["verdict"] == "INSUFFICIENT"
    assert compare.report(pairs(500, disagree=40))["verdict"] == "REVIEW"  # 92 % agreement
    # 30 answers only the candidate marks uncertain: McNemar z = 30 / sqrt(30) = 5.5
    flagged = compare.report(pairs(500, cand_uncertain=30))
    assert flagged["verdict"] == "REVIEW" and "significantly more" in " ".join(flagged["reasons"])
    # labelled: the candidate wrong on 12 the baseline got right (z = 3.46): roll back, whatever the agreement
    worse = compare.report(pairs(500, truth_wrong_candidate=12, labelled=200), thresholds=compare.Thresholds(min_agreement=0.9))
    assert worse["verdict"] == "ROLLBACK" and worse["versions"]["2.0"]["labelled"]["accuracy"] == 0.94


def test_the_report_reads_the_shadow_and_latency_figures():
    text = "\n".join([
        'shadow_requests_total{ModelName="fashion_cnn",ModelVersion="2.0",outcome="answered"} 495',
        'shadow_requests_total{ModelName="fashion_cnn",ModelVersion="2.0",outcome="failed"} 5',
        'shadow_requests_total{ModelName="fashion_cnn",ModelVersion="2.0",outcome="dropped"} 50',
        'shadow_latency_seconds_bucket{ModelName="fashion_cnn",ModelVersion="2.0",le="0.01"} 100',
        'shadow_latency_seconds_bucket{ModelName="fashion_cnn",ModelVersion="2.0",le="0.1"} 495',
        'shadow_latency_seconds_bucket{ModelName="fashion_cnn",ModelVersion="2.0",le="+Inf"} 495',
    ])
    rep = compare.report(pairs(500), text)
    assert rep["shadow"]["answered"] == 495 and rep["shadow"]["latency_p50_ms"] == pytest.approx(10 + 90 * (247.5 - 100) / 395, abs=0.01)
    checks = {c["check"]: c["verdict"] for c in rep["checks"]}
    assert checks["shadow failures"] == "PROMOTE"  # 5 of 500 = 1 %: at the limit
    assert checks["shadow drops"] == "REVIEW" and rep["verdict"] == "REVIEW"
    assert "verdict: REVIEW" in compare.render(rep)


ROUTE = ReplicaRoute(0, "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", "k" * 43, "m" * 43)


@needs_nginx
@pytest.mark.parametrize("split", [TrafficSplit(MODEL, "2.0", "shadow", 100.0), TrafficSplit(MODEL, "2.0", "shadow", 25.0),
                                   TrafficSplit(MODEL, "2.0", "canary", 12.5)])
def test_every_hop_renders_the_split_and_nginx_accepts_it(tmp_path, split):
    conf = render_hop(HopSettings(tmp_path, 1, ROUTE, split=split))
    (tmp_path / "tmp" / "hop-1").mkdir(parents=True)
    checked = nginx_accepts(tmp_path, conf, "hop-1.conf")
    assert checked.returncode == 0, checked.stderr
    route = conf.split(f"location = /predictions/{MODEL} {{")[1].split("}")[0]
    assert 'Authorization "Bearer ' + "k" * 43 in route and "error_page 507 = @worker_died;" in route
    if split.mode == "canary":
        assert "proxy_pass http://torchserve$rollout_uri;" in route and "mirror" not in route
        assert f'split_clients "${{request_id}}" $rollout_uri {{\n        12.5% /predictions/{MODEL}/2.0;' in conf
    else:
        assert "mirror /_shadow;" in route and "proxy_pass http://torchserve;" in route
        shadow = conf.split("location = /_shadow {")[1].split("\n        }")[0]
        assert f"proxy_pass http://shadow_sink/shadow/{MODEL}/2.0;" in shadow and "X-Shadow-Replica 1;" in shadow
        assert 'proxy_set_header Authorization "";' in shadow  # the replica's key stays in the hop
        assert "proxy_connect_timeout 100ms;" in shadow and "proxy_read_timeout 500ms;" in shadow
        assert ("$shadow_skip" in shadow) == (split.percent < 100)
    # every other route, the versioned URLs included, is as without a rollout
    plain = render_hop(HopSettings(tmp_path, 1, ROUTE))
    assert conf.split("        location / {")[1] == plain.split("        location / {")[1]


def test_a_hop_out_of_rotation_has_no_split(tmp_path):
    conf = render_hop(HopSettings(tmp_path, 0, ROUTE, serving=False, why="not ready",
                                  split=TrafficSplit(MODEL, "2.0", "shadow", 100.0)))
    assert "mirror" not in conf and "split_clients" not in conf and "ReplicaNotReady" in conf


@pytest.mark.parametrize("value", [0, 100, -3, 12.345, "ten", None])
def test_a_share_outside_0_to_100_is_refused_with_what_to_do(value):
    with pytest.raises(traffic.BadRolloutRequest, match="above 0 and below 100"):
        traffic.parse_percent(value)
    assert traffic.parse_percent("12.5") == 12.5


def merged(base, patch):
    """``patch`` merged into ``base``: mappings key by key, lists item by item (as the docs' patch is meant)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list):
        return [merged(b, p) for b, p in zip(base, patch)] + base[len(patch):]
    return patch


def test_the_kserve_canary_in_the_docs_validates_against_the_strict_schema():
    import yaml

    from tests.unit.test_kubernetes import REPO, isvc, kserve_errors, kserve_schema, strict

    text = (REPO / "docs" / "kubernetes.md").read_text()
    patch = yaml.safe_load(text.split("<!-- kserve-canary:")[1].split("```yaml")[1].split("```")[0])
    obj = merged(isvc(), patch)
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert obj["spec"]["predictor"]["containers"][0]["image"].endswith(":2.0")
    schema = strict(kserve_schema("InferenceService"))
    assert kserve_errors(obj, schema) == []
    typo = merged(isvc(), {"spec": {"predictor": {"canaryTrafficPercnt": 10}}})
    assert any("canaryTrafficPercnt" in e for e in kserve_errors(typo, schema))
