"""The Open Inference Protocol (v2) in the handler, inside TorchServe's real Context.

v2 requests share batches with every other shape; each is answered alone, in the v2
shape, with the same numbers the usual answer gives for the same image.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from handler import v2
from tests.conftest import png_bytes, run_batch

V2 = {"X-Inference-Protocol": "v2"}


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def infer_doc(*images: bytes, **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(i).decode() for i in images]}], **extra}


def test_v2_answers_carry_the_usual_numbers_for_each_image(tiny_handler):
    handler, ctx = tiny_handler
    a, b = image(1), image(2)
    statuses, bodies = run_batch(handler, ctx, [
        ({"body": infer_doc(a, b, id="req-7", parameters={"top_k": 2})}, V2),
        ({"body": a}, {"X-Top-K": "10"}),
        ({"body": b}, {"X-Top-K": "10"}),
    ])
    assert statuses == [200, 200, 200]
    answer, usual = bodies[0], bodies[1:]
    assert answer["id"] == "req-7" and answer["model_version"] == "1.0"
    out = {o["name"]: o for o in answer["outputs"]}
    assert list(out) == list(v2.OUTPUTS)
    assert out["label"]["data"] == [u["label"] for u in usual] and out["label"]["datatype"] == "BYTES"
    assert out["class_index"]["data"] == [u["class_index"] for u in usual]
    assert out["confidence"]["data"] == [u["confidence"] for u in usual]
    assert out["uncertain"]["data"] == [u["uncertain"] for u in usual]
    assert out["out_of_distribution"]["data"] == [u["out_of_distribution"] for u in usual]
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    for row, u in zip(probs, usual):  # the usual top_k (all 10 here) is the same distribution, ranked
        assert np.allclose(sorted(row, reverse=True), [t["probability"] for t in u["top_k"]], atol=1e-6)


def test_v2_as_bytes_and_with_a_requested_subset_of_outputs(tiny_handler):
    handler, ctx = tiny_handler
    doc = infer_doc(image(3), outputs=[{"name": "label"}, {"name": "probabilities"}])
    statuses, bodies = run_batch(handler, ctx, [({"body": json.dumps(doc).encode()}, V2)])
    assert statuses == [200]
    assert [o["name"] for o in bodies[0]["outputs"]] == ["label", "probabilities"]
    assert "id" not in bodies[0]


@pytest.mark.parametrize("doc, fragment", [
    ({}, '"inputs" must be a non-empty list'),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 'datatype "BYTES"'),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": ["aGk="]}]}, "product is the number"),
    ({"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                 {"name": "b", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, 'one input named "image"'),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "not valid base64"),
    ({**infer_doc(b"x"), "outputs": [{"name": "logits"}]}, "Unknown outputs ['logits']; valid: label"),
    ({**infer_doc(b"x"), "parameters": {"top_k": 99}}, "from 1 to 10"),
    ({**infer_doc(b"x"), "parameters": []}, '"parameters" must be an object'),
])
def test_bad_v2_requests_get_a_400_in_the_v2_error_shape_alone(tiny_handler, doc, fragment):
    handler, ctx = tiny_handler
    good = ({"body": infer_doc(image(4))}, V2)
    statuses, bodies = run_batch(handler, ctx, [good, ({"body": doc}, V2), good])
    assert statuses == [200, 400, 200]
    assert set(bodies[1]) == {"error"} and fragment in bodies[1]["error"], bodies[1]
    assert bodies[0] == bodies[2]


def test_a_v2_image_that_does_not_decode_names_its_position(tiny_handler):
    handler, ctx = tiny_handler
    statuses, bodies = run_batch(handler, ctx, [({"body": infer_doc(image(5), b"not an image")}, V2)])
    assert statuses == [400] and bodies[0]["error"].startswith("inputs[image].data[1]: ")
    assert "not an image" in bodies[0]["error"]


def test_v2_metadata_comes_from_the_spec(tiny_handler, tiny_spec):
    handler, ctx = tiny_handler
    statuses, bodies = run_batch(handler, ctx, [({"body": b""}, {**V2, "describe": "true"})])
    meta = bodies[0]
    assert statuses == [200] and meta["versions"] == ["1.0"]
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["datatype"] == "BYTES"
    assert meta["parameters"]["classes"] == list(tiny_spec.class_names)
    assert {o["name"] for o in meta["outputs"]} == set(v2.OUTPUTS)
