"""The handler class inside TorchServe's real Context object (no server): batches, errors, options."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest

from handler.tta_classifier import TTAClassifierHandler
from tests.conftest import make_context, png_bytes, run_batch, same_answer


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def test_a_bad_item_gets_its_own_4xx_and_the_rest_their_normal_answers(tiny_handler):
    handler, ctx = tiny_handler
    good = [({"body": image(i)}, {}) for i in range(5)]
    alone = [run_batch(handler, ctx, [req])[1][0] for req in good]
    batch = good[:3] + [({"body": b"this is not an image"}, {})] + good[3:]
    statuses, bodies = run_batch(handler, ctx, batch)
    assert statuses == [200, 200, 200, 415, 200, 200]
    assert bodies[3]["code"] == 415 and bodies[3]["type"] == "UnsupportedMediaType"
    assert "JPEG, PNG" in bodies[3]["message"]
    assert same_answer(bodies[:3] + bodies[4:], alone)
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(6))


def test_options_from_headers_any_case_and_json_fields(tiny_handler):
    handler, ctx = tiny_handler
    data = image(1)
    doc = json.dumps({"image": base64.b64encode(data).decode(), "top_k": 5, "tta": False})
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": data}, {"X-Tta": "Off", "x-TOP-k": "2"}),
        ({"body": doc.encode()}, {"Content-Type": "text/plain"}),
        ({"body": json.loads(doc)}, {}),  # TorchServe pre-parses application/json bodies
        ({"data": data, "top_k": b"1"}, {}),
        ({"body": data}, {}),
    ])
    assert statuses == [200] * 5
    assert [b["tta_views"] for b in bodies] == [1, 1, 1, 4, 4]
    assert [len(b["top_k"]) for b in bodies] == [2, 5, 5, 1, 3]


@pytest.mark.parametrize("headers, fragment", [
    ({"X-TTA": "maybe"}, "X-TTA must be one of on, true, 1, yes, off, false, 0, no"),
    ({"X-Top-K": "0"}, "from 1 to 10"),
    ({"X-Top-K": "11"}, "from 1 to 10"),
    ({"X-Top-K": "three"}, "from 1 to 10"),
])
def test_bad_header_options_are_400_naming_valid_values(tiny_handler, headers, fragment):
    handler, ctx = tiny_handler
    statuses, bodies = run_batch(handler, ctx, [({"body": image(2)}, headers)])
    assert statuses == [400] and bodies[0]["type"] == "InvalidOption"
    assert fragment in bodies[0]["message"]


def test_describe_and_explain_act_on_their_own_request_only(tiny_handler):
    handler, ctx = tiny_handler
    data = image(3)
    plain = run_batch(handler, ctx, [({"body": data}, {})])[1][0]
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": data}, {"describe": "True"}),
        ({"body": data}, {}),
        ({"body": data}, {"explain": "True"}),
        ({"body": data}, {}),
    ])
    assert statuses == [200] * 4
    assert bodies[0]["classes"][9] == "Ankle boot" and bodies[0]["tta"]["views"][0] == "identity"
    assert same_answer(bodies[1], plain) and same_answer(bodies[3], plain)
    views = bodies[2].pop("views")
    ood = bodies[2].pop("ood")
    assert bodies[2].pop("explanation")["method"] == "input-x-gradient"  # TinyCNN has no forward_features
    assert same_answer(bodies[2], plain)
    assert [v["view"] for v in views] == ["identity", "hflip", "shift(1,0)", "shift(-1,0)"]
    assert ood["method"] == "energy" and ood["parts"]["energy"] == plain["ood_score"]


def test_instances_are_answered_with_a_list_in_order(tiny_handler):
    handler, ctx = tiny_handler
    a, b = image(4), image(5)
    single = [run_batch(handler, ctx, [({"body": x}, {})])[1][0] for x in (a, b)]
    doc = {"instances": [{"image": base64.b64encode(a).decode()}, {"image": base64.b64encode(b).decode()}]}
    statuses, bodies = run_batch(handler, ctx, [({"body": doc}, {})])
    assert statuses == [200] and same_answer(bodies[0], single)


def test_model_config_handler_section_overrides_the_spec(tiny_model_dir):
    ctx = make_context(tiny_model_dir, {"minWorkers": 1, "maxWorkers": 1, "handler": {"tta": ["identity", "vflip"], "top_k": 5, "threshold": 0.99}})
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    _, bodies = run_batch(handler, ctx, [({"body": image(6)}, {})])
    assert bodies[0]["tta_views"] == 2 and len(bodies[0]["top_k"]) == 5 and bodies[0]["uncertain"] is True


def test_model_config_sets_the_tta_gate_and_describe_reports_it(tiny_model_dir):
    gate = {"metric": "top1", "below": 0.0}  # closed: no image is below 0
    ctx = make_context(tiny_model_dir, {"minWorkers": 1, "maxWorkers": 1, "handler": {"tta_gate": gate}})
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    _, bodies = run_batch(handler, ctx, [({"body": image(6)}, {}), ({"body": image(6)}, {"X-TTA": "all"}),
                                         ({"body": b""}, {"describe": "True"})])
    assert [b["tta_views"] for b in bodies[:2]] == [1, 4]
    assert bodies[2]["tta"]["gate"] == gate


def test_an_unknown_model_config_setting_fails_at_load_naming_valid_ones(tiny_model_dir):
    from handler.errors import SpecError

    ctx = make_context(tiny_model_dir, {"handler": {"ttta": ["identity"]}})
    with pytest.raises(SpecError, match=r"unknown setting\(s\) \['ttta'\]; valid settings are .*'tta'"):
        TTAClassifierHandler().initialize(ctx)


def metric_lines(caplog) -> list[str]:
    """Every [METRICS] line logged (a batch's lines travel in one record, one per line)."""
    return [line for r in caplog.records for line in r.getMessage().splitlines() if line.startswith("[METRICS]")]


def test_quality_metrics_are_emitted_with_their_dimensions(tiny_handler, caplog):
    handler, ctx = tiny_handler
    with caplog.at_level(logging.INFO):
        run_batch(handler, ctx, [({"body": image(7)}, {}), ({"body": b""}, {}), ({"body": image(8)}, {})])
    lines = metric_lines(caplog)
    names = {line[len("[METRICS]"):].split(".")[0] for line in lines}
    assert {"PredictionsPerLabel", "TopConfidence", "RejectedRequests", "StageLatency"} <= names
    rejected = [line for line in lines if line.startswith("[METRICS]RejectedRequests")]
    assert len(rejected) == 1 and "Reason:empty" in rejected[0] and "ModelName:tiny" in rejected[0]
    predicted = sum(float(line.split(":")[1].split("|")[0]) for line in lines if line.startswith("[METRICS]PredictionsPerLabel"))
    assert predicted == 2


def test_a_batchs_metric_lines_are_one_write_in_torchserves_own_format(tiny_handler, caplog, monkeypatch):
    """One log record per batch (TorchServe's stream handler flushes each record), whose lines are exactly
    what TorchServe's CachingMetric.emit_metrics logs for the same updates, so the frontend reads them alike."""
    import time

    from handler import metrics

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)
    handler, ctx = tiny_handler
    with caplog.at_level(logging.INFO):
        run_batch(handler, ctx, [({"body": image(7)}, {}), ({"body": b""}, {}), ({"body": image(8)}, {})])
    records = [r for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert len(records) == 1 and len(records[0].getMessage().splitlines()) >= 6
    ours = records[0].getMessage().splitlines()
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the same updates through TorchServe's own per-update emission
        for line in ours:
            name = line[len("[METRICS]"):].split(".")[0]
            metric = next(m for m in metrics.ALL if m[0] == name)
            value = line.split(":", 1)[1].split("|")[0]
            dims = [d.split(":", 1)[1] for d in line.split("|#")[1].split(",")]
            ctx.metrics.get_metric(name, metric[1]).add_or_update(float(value) if "." in value else int(value), dims)
    theirs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert ours == theirs


def test_readiness_probes_are_answered_but_kept_out_of_the_quality_metrics(tiny_handler, caplog):
    """The supervisor probes every replica every 2 s; counted, they would skew the label distribution at night."""
    handler, ctx = tiny_handler
    with caplog.at_level(logging.INFO):
        statuses, bodies = run_batch(handler, ctx, [({"body": image(7)}, {"X-Readiness-Probe": "true"}),
                                                    ({"body": image(8)}, {})])
    assert statuses == [200, 200] and "label" in bodies[0]
    lines = metric_lines(caplog)
    predicted = sum(float(line.split(":")[1].split("|")[0]) for line in lines if line.startswith("[METRICS]PredictionsPerLabel"))
    confidences = [line for line in lines if line.startswith("[METRICS]TopConfidence")]
    assert predicted == 1 and len(confidences) == 1


def test_an_unexpected_bug_on_one_request_is_isolated_to_it(tiny_handler, monkeypatch):
    import handler.tta_classifier as module

    handler, ctx = tiny_handler
    real = module.prepare

    def flaky(item, headers, spec):
        if item.get("body") == b"trigger":
            raise ZeroDivisionError("simulated bug")
        return real(item, headers, spec)

    monkeypatch.setattr(module, "prepare", flaky)
    statuses, bodies = run_batch(handler, ctx, [({"body": image(9)}, {}), ({"body": b"trigger"}, {}), ({"body": image(10)}, {})])
    assert statuses == [200, 500, 200]
    assert bodies[1]["type"] == "InternalError" and "req-1" in bodies[1]["message"]


def test_optimised_model_gives_the_same_answers_as_the_exported_one(tiny_model_dir):
    answers = []
    for optimize in (True, False):
        ctx = make_context(tiny_model_dir, {"handler": {"optimize": optimize}})
        handler = TTAClassifierHandler()
        handler.initialize(ctx)
        answers.append(run_batch(handler, ctx, [({"body": image(i)}, {}) for i in range(4)])[1])
    assert same_answer(answers[0], answers[1])
