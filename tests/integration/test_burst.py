"""A burst of concurrent requests (84 today), half valid and half invalid, through the real
TorchServe with batching on (batchSize 8 in model-config.yaml): every valid request
gets exactly the answer it gets alone, every invalid one its own 4xx, no request a 5xx,
and the workers that served the burst are the ones that were there before it."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from scripts.deploy.harness import EXAMPLE, REPO
from scripts.ops.tsclient import parse_prometheus
from tests.conftest import same_answer
from tests.integration.test_inputs_corpus import INVALID, VALID, b64, example, post

MODEL = "fashion_cnn"
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def valid_requests() -> list[dict]:
    """The corpus' valid inputs (42 today), plus explanations, describe headers and instance lists."""
    out = [case.request() for case in VALID if case.name != "exactly_the_pixel_limit"]  # 40 MP: kept out of the rush
    out += [{"body": example(name), "route": "explanations"} for name in NAMES[:2]]
    out += [{"body": example("coat"), "headers": {"describe": "true"}}]
    doc = {"instances": [{"image": b64(example(n)), "top_k": 1 + i} for i, n in enumerate(NAMES[4:8])]}
    out += [{"body": json.dumps(doc).encode(), "content_type": "application/json"}]
    return out


def invalid_requests(n: int) -> list[tuple[dict, object]]:
    cases = [case for case in INVALID if not case.name.startswith("zlib_bomb")] * 2  # no 40 MB zlib job twice
    return [(case.request(), case) for case in cases[:n]]


def counters(client) -> dict[str, float]:
    """Handler calls (one per batch), rejected requests, and 5xx answers so far."""
    totals = {"batches": 0.0, "rejected": 0.0, "5xx": 0.0}
    for name, labels, value in parse_prometheus(client.metrics_text()):
        if name == "StageLatency_count" and labels.get("Stage") == "preprocess":
            totals["batches"] += value
        elif name == "RejectedRequests":
            totals["rejected"] += value
        elif name == "Requests5XX":
            totals["5xx"] += value
    return totals


def workers(client) -> list[tuple[str, int, str]]:
    return sorted((w["id"], w["pid"], w["status"]) for w in client.describe(MODEL)[0]["workers"])


def test_the_shipped_config_batches_requests():
    config = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    assert config["batchSize"] == 8 and config["maxBatchDelay"] > 0


def test_a_burst_of_mixed_requests_each_answered_as_if_alone(client):
    valid = valid_requests()
    invalid = invalid_requests(len(valid))
    assert len(valid) >= 40 and len(invalid) == len(valid)
    alone = []
    for request in valid:
        resp = post(client, **request)
        assert resp.status_code == 200, resp.text[:300]
        alone.append(resp.json())
    boot = post(client, EXAMPLE.read_bytes()).json()
    before_workers, before = workers(client), counters(client)

    burst = [("valid", i, request) for i, request in enumerate(valid)]
    burst += [("invalid", i, request) for i, (request, _) in enumerate(invalid)]
    random.Random(0).shuffle(burst)
    start = time.monotonic()
    with ThreadPoolExecutor(len(burst)) as pool:
        responses = list(pool.map(lambda job: post(client, **job[2]), burst))
    elapsed = time.monotonic() - start

    for (kind, i, _), resp in zip(burst, responses):
        if kind == "valid":
            assert resp.status_code == 200, resp.text[:300]
            assert same_answer(resp.json(), alone[i]), (i, resp.json(), alone[i])
        else:
            case = invalid[i][1]
            assert resp.status_code == case.status, (case.name, resp.status_code, resp.text[:300])
            body = resp.json()
            assert body["type"] == case.kind and all(f in body["message"] for f in case.says), (case.name, body)
    assert elapsed < 60, f"the burst took {elapsed:.1f} s"

    # Metrics reach the frontend asynchronously: wait until every rejection is counted.
    deadline, after = time.monotonic() + 20, counters(client)
    while after["rejected"] - before["rejected"] < len(invalid) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = counters(client)
    assert after["rejected"] - before["rejected"] == len(invalid)
    assert after["5xx"] == before["5xx"]
    handler_calls = after["batches"] - before["batches"]
    # ~15 handler calls for 80 requests when measured (before HEIC and AVIF joined the corpus): batches of valid and invalid requests together.
    assert handler_calls <= len(burst) // 2, f"{handler_calls:.0f} handler calls for {len(burst)} requests: hardly anything was batched"

    assert workers(client) == before_workers  # same ids and pids: no worker crashed or restarted
    assert all(status == "READY" for _, _, status in before_workers)
    assert same_answer(post(client, EXAMPLE.read_bytes()).json(), boot)
