"""A batch goes through the model in at most TWO forward passes, whatever its mix of requests.

The identity view of every image first, then the extra views of exactly the images that
get them (asked for TTA and passed the gate, or asked for every view), stacked view-major.
The proof counts calls inside the model itself: a TorchScript module that wraps a
real CNN and, in its scripted ``forward``, increments a ``calls`` buffer and records
the batch size it was given. The handler loads it from disk exactly as it loads
any served model (spec.json in the .pt's extra files, then the loader's checks and
freezing; a buffer mutated in ``forward`` survives ``torch.jit.freeze``), through
TorchServe's real ``Context``, so nothing in the handler is patched.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from handler.inference import Policy, classify
from handler.tta import Gate, parse_view
from tests.conftest import TinyCNN, make_context, png_bytes, run_batch, save_scripted, write_manifest

VIEWS = ("identity", "hflip", "shift(1,0)", "shift(-1,0)")


class CountingModel(nn.Module):
    """TinyCNN that counts its own forward calls and remembers the rows of each (scripted)."""

    def __init__(self):
        super().__init__()
        self.inner = TinyCNN()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("rows", torch.zeros(64, dtype=torch.long))  # batch size of call i (first 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = int(self.calls.item())
        if i < 64:
            self.rows[i] = x.shape[0]
        self.calls.add_(1)
        return self.inner(x)


def reset(model) -> None:
    model.calls.zero_()
    model.rows.zero_()


def rows_of(model) -> list[int]:
    return model.rows[: int(model.calls)].tolist()


@pytest.fixture
def counting_handler(tmp_path, tiny_spec):
    from handler.tta_classifier import TTAClassifierHandler

    assert tiny_spec.tta == VIEWS  # the conftest spec: 4 views
    save_scripted(CountingModel(), tiny_spec, tmp_path / "counting.pt")
    write_manifest(tmp_path, "counting", "counting.pt")
    ctx = make_context(tmp_path)
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    assert isinstance(handler.model, torch.jit.ScriptModule)
    assert int(handler.model.calls) >= 2  # the loader's own checks ran through the counter: it counts
    reset(handler.model)
    return handler, ctx


def images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


def test_a_mixed_batch_is_two_forward_passes_identity_then_every_extra_view(counting_handler):
    handler, ctx = counting_handler
    a, b, c, d, e, f = images(6)
    instances = {"instances": [
        {"image": base64.b64encode(e).decode()},
        {"image": base64.b64encode(f).decode(), "tta": False},
    ]}
    batch = [
        ({"body": a}, {}),                          # TTA on (spec default)
        ({"body": b}, {"X-TTA": "off"}),            # TTA off by header
        ({"body": c}, {}),                          # TTA on
        ({"body": b"not an image"}, {}),            # rejected: must not reach the model
        ({"body": d}, {"x-tta": "on"}),             # TTA on by header
        ({"body": json.dumps(instances).encode()}, {"Content-Type": "application/json"}),  # 2 images: on, off
    ]
    statuses, bodies = run_batch(handler, ctx, batch)
    assert statuses == [200, 200, 200, 415, 200, 200]
    n_images, n_tta = 6, 4  # a, b, c, d, e, f; TTA on for a, c, d, e (the spec has no gate)
    assert int(handler.model.calls) == 2
    assert rows_of(handler.model) == [n_images, n_tta * (len(VIEWS) - 1)]  # 6, then 4 * 3 = 12 rows
    assert [bodies[i]["tta_views"] for i in (0, 1, 2, 4)] == [4, 1, 4, 4]
    assert [item["tta_views"] for item in bodies[5]] == [4, 1]


def test_tta_off_for_everyone_sends_only_the_identity_rows(counting_handler):
    handler, ctx = counting_handler
    statuses, bodies = run_batch(handler, ctx, [({"body": img}, {"X-TTA": "off"}) for img in images(5)])
    assert statuses == [200] * 5 and all(b["tta_views"] == 1 for b in bodies)
    assert rows_of(handler.model) == [5]


def test_a_batch_of_only_bad_requests_never_calls_the_model(counting_handler):
    handler, ctx = counting_handler
    statuses, _ = run_batch(handler, ctx, [({"body": b""}, {}), ({"body": b"%PDF-1.4"}, {})])
    assert statuses == [400, 415]
    assert int(handler.model.calls) == 0


def test_one_batch_answers_each_request_as_if_it_were_alone(counting_handler):
    """Batching is invisible to clients: same probabilities as one request per batch (one call each)."""
    handler, ctx = counting_handler
    batch = [({"body": img}, {"X-TTA": "off"} if i % 2 else {}) for i, img in enumerate(images(5, seed=1))]
    _, together = run_batch(handler, ctx, batch)
    alone = [run_batch(handler, ctx, [request])[1][0] for request in batch]
    assert rows_of(handler.model) == [5, 3 * 3] + [1, 3, 1, 1, 3, 1, 1, 3]
    for t, a in zip(together, alone):
        assert t["label"] == a["label"] and t["tta_views"] == a["tta_views"]
        assert [p["probability"] for p in t["top_k"]] == pytest.approx([p["probability"] for p in a["top_k"]], abs=1e-5)


class Recorder:
    """Eager stand-in that records what classify() feeds the model."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, x):
        self.inputs.append(x.clone())
        return self.model(x)


@pytest.mark.parametrize("mask", [[1, 0, 1, 1, 0], [0, 0, 0], [1], [0, 1, 0, 0, 0, 0, 0, 1]])
def test_classify_stacks_the_extra_views_view_major_in_one_second_call(tiny_spec, mask):
    torch.manual_seed(0)
    x = torch.randn(len(mask), 1, 28, 28)
    use_tta = torch.tensor(mask, dtype=torch.bool)
    policy = Policy.from_spec(tiny_spec)
    model = Recorder(TinyCNN().eval())
    result = classify(model, x, use_tta, policy)
    on = x[use_tta]
    assert len(model.inputs) == (2 if len(on) else 1)
    assert torch.equal(model.inputs[0], x)
    if len(on):
        assert torch.equal(model.inputs[1], torch.cat([parse_view(v)(on, policy.fill) for v in VIEWS[1:]]))
    assert result.n_views.tolist() == [len(VIEWS) if m else 1 for m in mask]
    assert result.probs.shape == (len(mask), 10)
    assert torch.allclose(result.probs.sum(-1), torch.ones(len(mask)), atol=1e-5)


def gated(spec, metric: str, below: float):
    return Policy.from_spec(dataclasses.replace(spec, tta_gate=Gate(metric, below)))


@pytest.mark.parametrize("metric", ["top1", "margin"])
def test_the_gate_sends_exactly_the_unsure_images_through_the_extra_views(tiny_spec, metric):
    torch.manual_seed(1)
    x = torch.randn(12, 1, 28, 28)
    model = Recorder(TinyCNN().eval())
    ungated = classify(model, x, torch.ones(12, dtype=torch.bool), Policy.from_spec(tiny_spec))
    identity = ungated.view_probs  # (views, K) per image; row 0 is the identity view
    scores = torch.stack([Gate(metric).score(p[:1])[0] for p in identity])
    below = float(scores.median())  # half the images are unsure
    model.inputs.clear()
    result = classify(model, x, torch.ones(12, dtype=torch.bool), gated(tiny_spec, metric, below))
    unsure = scores < below
    assert 0 < int(unsure.sum()) < 12
    assert [len(t) for t in model.inputs] == [12, int(unsure.sum()) * (len(VIEWS) - 1)]
    assert result.n_views.tolist() == [len(VIEWS) if u else 1 for u in unsure.tolist()]
    # An unsure image's answer is the full-TTA answer; a confident one's is its identity answer.
    for i in range(12):
        expected = ungated.probs[i] if unsure[i] else identity[i][0]
        assert torch.allclose(result.probs[i], expected, atol=1e-6)


def test_a_closed_gate_is_tta_off_and_forcing_opens_it_per_image(tiny_spec):
    torch.manual_seed(2)
    x = torch.randn(6, 1, 28, 28)
    model = Recorder(TinyCNN().eval())
    off = classify(model, x, torch.zeros(6, dtype=torch.bool), Policy.from_spec(tiny_spec))
    model.inputs.clear()
    closed = gated(tiny_spec, "top1", 0.0)  # nothing is below 0: no image gets the extra views
    shut = classify(model, x, torch.ones(6, dtype=torch.bool), closed)
    assert len(model.inputs) == 1 and torch.equal(shut.probs, off.probs) and shut.n_views.tolist() == [1] * 6
    model.inputs.clear()
    force = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    forced = classify(model, x, torch.ones(6, dtype=torch.bool), closed, force=force)
    full = classify(Recorder(TinyCNN().eval()), x, torch.ones(6, dtype=torch.bool), Policy.from_spec(tiny_spec))
    assert [len(t) for t in model.inputs] == [6, 2 * (len(VIEWS) - 1)]
    assert forced.n_views.tolist() == [len(VIEWS) if f else 1 for f in force.tolist()]
    for i in range(6):
        assert torch.allclose(forced.probs[i], full.probs[i] if force[i] else off.probs[i], atol=1e-6)


def test_x_tta_all_forces_every_view_past_the_gate_through_the_handler(tmp_path, tiny_spec):
    from handler.tta_classifier import TTAClassifierHandler

    save_scripted(CountingModel(), dataclasses.replace(tiny_spec, tta_gate=Gate("top1", 0.0)), tmp_path / "c.pt")
    write_manifest(tmp_path, "counting", "c.pt")
    ctx = make_context(tmp_path)
    handler = TTAClassifierHandler()
    handler.initialize(ctx)
    reset(handler.model)
    a, b, c = images(3, seed=3)
    all_json = json.dumps({"image": base64.b64encode(c).decode(), "tta": "all"}).encode()
    batch = [({"body": a}, {}), ({"body": b}, {"X-TTA": "all"}), ({"body": all_json}, {"Content-Type": "application/json"})]
    statuses, bodies = run_batch(handler, ctx, batch)
    assert statuses == [200, 200, 200]
    assert [body["tta_views"] for body in bodies] == [1, len(VIEWS), len(VIEWS)]  # the closed gate keeps a at 1
    assert rows_of(handler.model) == [3, 2 * (len(VIEWS) - 1)]
