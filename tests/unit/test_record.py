"""handler/record.py inside the real handler and TorchServe's real Context: every answer in the spool, nothing more,
the exact canonical input, uploads only for the review sample when asked, never a failed batch, losses counted."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handler import record
from handler.errors import known_reasons
from handler.preprocess import canonical_image
from handler.tta_classifier import TTAClassifierHandler
from tests.conftest import make_context, png_bytes, run_batch


def image(seed: int, size: int = 28) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


def photo(seed: int) -> bytes:
    """A dark garment-like blob on a light backdrop, larger than 28x28: canonicalisation does real work."""
    rng = np.random.default_rng(seed)
    arr = np.full((90, 70), 230, dtype=np.uint8)
    arr[20:75, 15:55] = rng.integers(10, 60, (55, 40), dtype=np.uint8)
    return png_bytes(arr)


def settings_file(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"spool": str(tmp_path / "spool"), **extra}))
    return path


@pytest.fixture
def recording(tiny_model_dir, tmp_path, monkeypatch):
    """A handler whose worker was started with the stack's SERVE_RECORD setting: (handler, ctx, spool folder)."""
    def make(yaml_config=None, **extra):
        monkeypatch.setenv(record.RECORD_ENV, str(settings_file(tmp_path, **extra)))
        ctx = make_context(tiny_model_dir, yaml_config)
        handler = TTAClassifierHandler()
        handler.initialize(ctx)
        return handler, ctx, tmp_path / "spool"
    return make


def spool_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]


def answers(folder: Path) -> list[dict]:
    return [line for line in spool_lines(folder) if line["type"] == "answer"]


def test_every_answered_image_is_one_spool_line_with_what_the_client_got(recording):
    handler, ctx, spool = recording()
    listed = json.dumps({"instances": [{"image": base64.b64encode(image(i)).decode()} for i in (3, 4)]})
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": image(1)}, {"X-Request-ID": "req-a"}),
        ({"body": b"not an image"}, {"X-Request-ID": "req-bad"}),  # refused: nothing to record
        ({"body": image(2)}, {"X-Request-ID": "probe", "X-Readiness-Probe": "true"}),  # the supervisor's probe
        ({"body": listed.encode()}, {"X-Request-ID": "req-list"}),
        ({"body": image(5)}, {}),  # no gateway in front: TorchServe's own request id
    ])
    assert statuses == [200, 415, 200, 200, 200]
    lines = spool_lines(spool)
    assert lines[0]["type"] == "model" and lines[0]["classes"] == list(handler.spec.class_names)
    got = answers(spool)
    assert [(a["request_id"], a["item"]) for a in got] == [("req-a", 0), ("req-list", 0), ("req-list", 1), ("req-4", 0)]
    for a, body in zip(got, [bodies[0], *bodies[3], bodies[4]]):
        assert {k: a[k] for k in ("label", "class_index", "confidence", "uncertain", "ood_score", "tta_views")} == \
            {k: body[k] for k in ("label", "class_index", "confidence", "uncertain", "ood_score", "tta_views")}
        assert a["ood"] == body["out_of_distribution"] and a["model"] == "tiny" and a["version"] == "1.0"
        assert a["review"] == record.in_review_sample(a["request_id"], a["item"], a["uncertain"], a["ood"], 0.05)
        assert a["upload"] is None  # uploads are not kept by default


@pytest.mark.parametrize("make", [photo, lambda seed: image(seed, 28)], ids=["photo", "native"])
def test_the_recorded_input_is_exactly_the_canonical_image_the_model_saw(recording, make):
    handler, ctx, spool = recording()
    uploads = [make(seed) for seed in range(6)]
    run_batch(handler, ctx, [({"body": data}, {"X-Request-ID": f"r{i}"}) for i, data in enumerate(uploads)])
    for data, line in zip(uploads, answers(spool)):
        expected = np.asarray(canonical_image(Image.open(io.BytesIO(data)), handler.spec).image)
        got = record.decode_input(line["input"])
        assert got.shape == (28, 28, 1) and np.array_equal(got[..., 0], expected)


def test_uploads_are_kept_for_the_review_sample_only_when_asked(recording):
    # threshold 0: the tiny model's answers are all confident, so only the random share is reviewed
    handler, ctx, spool = recording({"handler": {"threshold": 0.0}}, keep_uploads=True, review_share=0.5)
    uploads = {f"id-{i}": image(10 + i) for i in range(24)}
    run_batch(handler, ctx, [({"body": data}, {"X-Request-ID": rid}) for rid, data in uploads.items()][:8])
    run_batch(handler, ctx, [({"data": data}, {"X-Request-ID": rid}) for rid, data in uploads.items()][8:16])  # multipart
    run_batch(handler, ctx, [({"body": {"image": base64.b64encode(data).decode()}}, {"X-Request-ID": rid})
                             for rid, data in list(uploads.items())[16:]])  # JSON, parsed by TorchServe
    got = answers(spool)
    assert len(got) == 24
    reviewed = [a for a in got if a["review"]]
    assert 0 < len(reviewed) < 24  # the share draws some confident answers, not all
    for a in got:
        if a["review"]:
            assert base64.b64decode(a["upload"]) == uploads[a["request_id"]]
        else:
            assert a["upload"] is None


def test_a_spool_that_cannot_be_written_loses_the_record_not_the_answer(recording, caplog):
    handler, ctx, spool = recording()
    run_batch(handler, ctx, [({"body": image(1)}, {})])
    os.close(handler.recorder.spool.fd)  # the disk is full from now on: every write fails (ENOSPC)
    handler.recorder.spool.fd = os.open("/dev/full", os.O_WRONLY)
    with caplog.at_level(logging.INFO):
        statuses, bodies = run_batch(handler, ctx, [({"body": image(2)}, {}), ({"body": image(3)}, {})])
    assert statuses == [200, 200] and all("label" in b for b in bodies)
    lost = [r.getMessage() for r in caplog.records if "[METRICS]RecordLost" in r.getMessage()]
    assert lost and "RecordLost.Count:2|#ModelName:tiny,ModelVersion:1.0,Reason:write_error" in lost[0]


def test_a_full_spool_drops_and_counts_instead_of_filling_the_disk(recording, caplog):
    handler, ctx, spool = recording(max_spool_bytes=6000)
    with caplog.at_level(logging.INFO):
        for i in range(20):
            statuses, _ = run_batch(handler, ctx, [({"body": image(i)}, {})])
            assert statuses == [200]
    size = sum(p.stat().st_size for p in spool.glob("*"))
    assert size <= 6000
    lost = Counter()
    for r in caplog.records:
        for line in r.getMessage().splitlines():
            if line.startswith("[METRICS]RecordLost"):
                lost[line.split("Reason:")[1].split("|")[0]] += int(line.split(":")[1].split("|")[0])
    recorded = len(answers(spool))
    assert lost["spool_full"] == 20 - recorded and recorded >= 1


def test_counters_start_at_zero_for_every_known_label_value_when_a_worker_starts(tiny_model_dir, tmp_path, monkeypatch,
                                                                               caplog):
    monkeypatch.setenv(record.RECORD_ENV, str(settings_file(tmp_path)))
    ctx = make_context(tiny_model_dir)
    handler = TTAClassifierHandler()
    with caplog.at_level(logging.INFO):
        handler.initialize(ctx)
    lines = [line for r in caplog.records for line in r.getMessage().splitlines() if line.startswith("[METRICS]")]
    zero = {(line[9:].split(".")[0], line.split("|#")[1].split(",")[-1]) for line in lines if ".Count:0|" in line}
    assert {("PredictionsPerLabel", f"Label:{c}") for c in handler.spec.class_names} <= zero
    names = {name for name, _ in zero}
    assert {"PredictionsPerLabel", "UncertainPredictions", "OutOfDistributionPredictions", "TTADisagreement",
            "TTAAugmented", "RejectedRequests", "RecordedAnswers", "RecordLost"} <= names
    assert {f"Reason:{r}" for r in known_reasons()} <= {dims for name, dims in zero if name == "RejectedRequests"}
    assert {"unsupported_format", "invalid_v2", "invalid_base64", "too_large"} <= set(known_reasons())
    assert {f"Reason:{r}" for r in record.LOSS_REASONS} <= {dims for name, dims in zero if name == "RecordLost"}
    assert len({dims for name, dims in zero if name == "PredictionsPerLabel"}) == 10
    assert not any(line.startswith(("[METRICS]TopConfidence", "[METRICS]StageLatency")) for line in lines)


def test_without_the_stack_setting_nothing_is_recorded(tiny_handler, tmp_path):
    handler, ctx = tiny_handler
    assert handler.recorder is None
    statuses, _ = run_batch(handler, ctx, [({"body": image(1)}, {})])
    assert statuses == [200]


def test_the_review_draw_is_fixed_by_the_request_and_uniform():
    draws = [record.review_draw(f"id-{i}", 0) for i in range(20000)]
    assert draws[:3] == [record.review_draw(f"id-{i}", 0) for i in range(3)]
    assert record.review_draw("x", 0) != record.review_draw("x", 1)
    share = sum(d < 0.05 for d in draws) / len(draws)
    assert 0.045 < share < 0.055  # binomial sd 0.0015 at n = 20,000
    assert record.in_review_sample("x", 0, True, False, 0.0) and record.in_review_sample("x", 0, False, True, 0.0)
    assert not record.in_review_sample("x", 0, False, False, 0.0)
