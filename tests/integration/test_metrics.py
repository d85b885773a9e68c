"""Our custom metrics on TorchServe's real /metrics after known requests, with the right labels.

The server loads two versions of fashion_cnn (load_models) so that the ModelVersion
dimension is checked too. Counts are compared as deltas between two scrapes, and
the frontend publishes a worker's metric lines a moment after the answer, so the
second scrape is polled until it settles.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from scripts.deploy.harness import REPO, make_two_version_server
from scripts.ops import drift
from scripts.ops.tsclient import parse_prometheus

MODEL = "fashion_cnn"
BOOT = (REPO / "examples" / "ankle_boot.png").read_bytes()
BAG = (REPO / "examples" / "bag.png").read_bytes()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = make_two_version_server(tmp_path_factory.mktemp("metrics"))
    server.start()
    try:
        deadline = time.monotonic() + 180
        while not all(d["workers"] and all(w["status"] == "READY" for w in d["workers"])
                      for d in server.client.describe(MODEL)):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def samples(srv) -> dict[tuple[str, tuple], float]:
    """{(name, sorted labels without Hostname): value} for our model's samples."""
    out = {}
    for name, labels, value in parse_prometheus(srv.client.metrics_text()):
        if labels.get("ModelName") == MODEL:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "Hostname"))
            out[(name, key)] = value
    return out


def delta(after: dict, before: dict) -> dict:
    changed = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in changed.items() if abs(v) > 1e-12}


def settle(srv, before: dict, done, timeout: float = 15.0) -> dict:
    """Scrape until ``done(delta)`` holds (or the time is up); return the delta."""
    end = time.monotonic() + timeout
    while True:
        d = delta(samples(srv), before)
        if done(d) or time.monotonic() > end:
            return d
        time.sleep(0.3)


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return name, tuple(sorted({"ModelName": MODEL, **labels}.items()))


def test_three_ankle_boots_and_one_garbage_body(srv):
    before = samples(srv)
    answers = [srv.client.predict(MODEL, BOOT) for _ in range(3)]
    assert [a.json()["label"] for a in answers] == ["Ankle boot"] * 3
    garbage = srv.client.predict(MODEL, b"\x00\x01 definitely not an image \xff" * 10, check=False)
    assert garbage.status_code == 415 and garbage.json()["type"] == "UnsupportedMediaType"

    boots = key("PredictionsPerLabel", ModelVersion="1.0", Label="Ankle boot")
    rejected = key("RejectedRequests", ModelVersion="1.0", Reason="unsupported_format")
    conf_count = key("TopConfidence_count", ModelVersion="1.0")
    d = settle(srv, before, lambda d: d.get(boots) == 3 and d.get(rejected) == 1 and d.get(conf_count) == 3)

    assert d.get(boots) == 3.0
    assert d.get(rejected) == 1.0
    # no other label and no other version moved
    assert [k for k in d if k[0] == "PredictionsPerLabel"] == [boots]
    assert not [k for k in d if ("ModelVersion", "2.0") in k[1]]
    # the three confidences landed in the (0.75, 1] bucket of the histogram, and their sum is theirs
    conf = [a.json()["confidence"] for a in answers]
    assert d.get(key("TopConfidence_bucket", ModelVersion="1.0", le="0.75"), 0.0) == 0.0
    assert d[key("TopConfidence_bucket", ModelVersion="1.0", le="1.0")] == 3.0
    assert d[conf_count] == 3.0
    assert d[key("TopConfidence_sum", ModelVersion="1.0")] == pytest.approx(sum(conf), abs=1e-4)
    # each stage was timed (once per batch: between 1 and 4 batches for these 4 requests)
    for stage in ("preprocess", "inference", "postprocess"):
        assert 1 <= d[key("StageLatency_count", ModelVersion="1.0", Stage=stage)] <= 4


def test_labels_follow_the_version_that_answered(srv):
    before = samples(srv)
    assert srv.client.predict(MODEL, BAG, version="2.0").headers["X-Model-Version"] == "2.0"
    assert srv.client.predict(MODEL, BAG).headers["X-Model-Version"] == "1.0"
    v1 = key("PredictionsPerLabel", ModelVersion="1.0", Label="Bag")
    v2 = key("PredictionsPerLabel", ModelVersion="2.0", Label="Bag")
    d = settle(srv, before, lambda d: d.get(v1) == 1 and d.get(v2) == 1)
    assert d.get(v1) == 1.0 and d.get(v2) == 1.0


def test_instances_uncertain_answers_and_bad_options_are_counted(srv):
    """A list request counts one prediction per image; uncertain answers as the client saw them."""
    rng = np.random.default_rng(0)

    def png(array) -> str:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    noise = [png(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)) for _ in range(12)]
    doc = {"instances": [{"image": b} for b in noise] + [{"image": base64.b64encode(BOOT).decode()}]}
    before = samples(srv)
    resp = srv.client.predict(MODEL, json.dumps(doc).encode(), content_type="application/json")
    answers = resp.json()
    assert len(answers) == 13
    bad = srv.client.predict(MODEL, BOOT, headers={"X-Top-K": "99"}, check=False)
    assert bad.status_code == 400

    expected_labels: dict[str, int] = {}
    for a in answers:
        expected_labels[a["label"]] = expected_labels.get(a["label"], 0) + 1
    uncertain = sum(a["uncertain"] for a in answers)
    assert uncertain >= 1  # noise images (seed 0) give some uncertain answers: the counter is exercised
    conf_count = key("TopConfidence_count", ModelVersion="1.0")
    d = settle(srv, before, lambda d: d.get(conf_count) == 13 and
               d.get(key("RejectedRequests", ModelVersion="1.0", Reason="invalid_option")) == 1)
    got = {dict(k[1])["Label"]: v for k, v in d.items() if k[0] == "PredictionsPerLabel"}
    assert got == expected_labels
    assert d.get(key("UncertainPredictions", ModelVersion="1.0"), 0.0) == uncertain
    assert d.get(key("RejectedRequests", ModelVersion="1.0", Reason="invalid_option")) == 1.0
    # the scrape parsed the way ctl metrics / drift read it
    snap = drift.Snapshot.from_text(srv.client.metrics_text(), MODEL, "1.0")
    assert snap.predictions >= 13 and snap.rejected["invalid_option"] >= 1
