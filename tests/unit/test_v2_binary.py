"""The binary tensor data extension of the Open Inference Protocol, in the handler (TorchServe's real Context).

Requests are built, and answers read, by ``tritonclient.http``'s own encoder and decoder
(``generate_request_body`` / ``InferResult.from_response_body``): what the client sends by
default, with no server in between. Each request is answered alone in its batch.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient

from handler import v2
from tests.conftest import png_bytes, run_batch

V2 = {"X-Inference-Protocol": "v2"}


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def triton_request(*images: bytes, outputs: list | None = None, parameters: dict | None = None,
                   request_id: str = "") -> tuple[dict, dict]:
    """(item, headers) as TorchServe hands them over for what tritonclient.http.infer sends (binary_data=True)."""
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # the client's default: binary_data=True
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id=request_id, parameters=parameters)
    headers = {**V2, "Inference-Header-Content-Length": str(json_size)} if json_size is not None else dict(V2)
    return {"body": body}, headers


def run_raw(handler, ctx, requests):
    """Like run_batch, but the raw payloads and response headers (binary answers are bytes)."""
    from ts.context import RequestProcessor

    ctx.request_processor = [RequestProcessor(dict(headers)) for _, headers in requests]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    ctx.metrics.set_request_ids(ctx.request_ids)
    out = handler.handle([item for item, _ in requests], ctx)
    return [(ctx.get_response_status(i)[0], ctx.get_response_headers(i), out[i]) for i in range(len(requests))]


def decode(headers: dict, payload) -> httpclient.InferResult:
    length = headers.get("Inference-Header-Content-Length")
    data = payload if isinstance(payload, (bytes, bytearray)) else payload.encode()
    return httpclient.InferResult.from_response_body(bytes(data), header_length=int(length) if length else None)


def test_a_binary_request_with_binary_outputs_gets_the_usual_numbers(tiny_handler):
    handler, ctx = tiny_handler
    a, b = image(1), image(2)
    results = run_raw(handler, ctx, [triton_request(a, b, request_id="r-1"),
                                     ({"body": a}, {"X-Top-K": "10"}), ({"body": b}, {"X-Top-K": "10"})])
    (status, headers, payload), usual = results[0], [json.loads(r[2]) for r in results[1:]]
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert isinstance(payload, bytes) and int(headers["Inference-Header-Content-Length"]) < len(payload)
    result = decode(headers, payload)
    assert result.get_response()["id"] == "r-1"
    assert [x.decode() for x in result.as_numpy("label")] == [u["label"] for u in usual]
    assert result.as_numpy("class_index").tolist() == [u["class_index"] for u in usual]
    assert result.as_numpy("class_index").dtype == np.int64
    assert result.as_numpy("confidence").tolist() == [np.float32(u["confidence"]) for u in usual]
    assert result.as_numpy("uncertain").tolist() == [u["uncertain"] for u in usual]
    assert result.as_numpy("out_of_distribution").tolist() == [u["out_of_distribution"] for u in usual]
    assert result.as_numpy("ood_score").tolist() == [np.float32(u["ood_score"]) for u in usual]
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_per_output_binary_data_mixes_binary_and_json_outputs(tiny_handler):
    handler, ctx = tiny_handler
    outputs = [httpclient.InferRequestedOutput("label", binary_data=True),
               httpclient.InferRequestedOutput("confidence", binary_data=False)]
    [(status, headers, payload)] = run_raw(handler, ctx, [triton_request(image(3), outputs=outputs)])
    assert status == 200
    result = decode(headers, payload)
    raw = result.get_response()
    assert [o["name"] for o in raw["outputs"]] == ["label", "confidence"]
    assert "binary_data_size" in raw["outputs"][0]["parameters"] and "data" in raw["outputs"][1]
    assert result.as_numpy("label").shape == (1,) and result.as_numpy("confidence").shape == (1,)


def test_binary_input_with_json_outputs_is_plain_json(tiny_handler):
    handler, ctx = tiny_handler
    outputs = [httpclient.InferRequestedOutput("label", binary_data=False)]
    [(status, headers, payload)] = run_raw(handler, ctx, [triton_request(image(4), outputs=outputs)])
    assert status == 200 and headers["content-type"] == "application/json"
    assert "Inference-Header-Content-Length" not in headers
    assert json.loads(payload)["outputs"][0]["name"] == "label"


def test_the_binary_image_is_the_file_and_json_stays_base64(tiny_handler):
    """The same PNG as a binary element and as base64 in JSON gets the same answer."""
    import base64

    handler, ctx = tiny_handler
    png = image(5)
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]}
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in v2.OUTPUTS]
    statuses, bodies = run_batch(handler, ctx, [triton_request(png, outputs=outputs), ({"body": doc}, V2)])
    assert statuses == [200, 200] and bodies[0]["outputs"] == bodies[1]["outputs"]


def binary_body(header: dict, tail: bytes) -> tuple[dict, dict]:
    data = json.dumps(header).encode()
    return {"body": data + tail}, {**V2, "Inference-Header-Content-Length": str(len(data))}


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def image_input(size: int, shape=(1,), datatype="BYTES", **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": list(shape),
                        "parameters": {"binary_data_size": size}}], **extra}


PNG = image(6)
MALFORMED = {
    "header_length_over_the_body": (lambda: ({"body": b'{"inputs": []}'}, {**V2, "Inference-Header-Content-Length": "999"}),
                                    400, "must be the length in bytes of the JSON header"),
    "header_length_not_a_number": (lambda: ({"body": b'{"inputs": []}'}, {**V2, "Inference-Header-Content-Length": "ten"}),
                                   400, "Inference-Header-Content-Length is 'ten'"),
    "header_length_zero": (lambda: ({"body": b'{"inputs": []}'}, {**V2, "Inference-Header-Content-Length": "0"}),
                           400, "must be the length in bytes"),
    "header_length_cuts_the_json": (lambda: ({"body": b'{"inputs": []}' + element(PNG)},
                                             {**V2, "Inference-Header-Content-Length": "5"}), 400, "is not valid JSON"),
    "binary_sizes_short_of_the_body": (lambda: binary_body(image_input(10), element(PNG)), 400, "add up to 10"),
    "binary_sizes_over_the_body": (lambda: binary_body(image_input(len(PNG) + 400), element(PNG)), 400,
                                   f"add up to {len(PNG) + 400}"),
    "element_length_over_the_data": (lambda: binary_body(image_input(len(PNG) + 4), struct.pack("<I", len(PNG) + 9) + PNG),
                                     400, "only"),
    "element_length_prefix_cut": (lambda: binary_body(image_input(len(PNG) + 6), element(PNG) + b"\x01\x00"), 400,
                                  "where its 4-byte length should be"),
    "more_elements_than_the_shape": (lambda: binary_body(image_input(2 * len(PNG) + 8), element(PNG) * 2), 400,
                                     'holds 2 elements, but "shape" says 1'),
    "truncated_image_in_an_element": (lambda: binary_body(image_input(len(PNG) // 2 + 4), element(PNG[: len(PNG) // 2])),
                                      400, "inputs[image].data[0]: The PNG image is corrupt or truncated"),
    "not_an_image_in_an_element": (lambda: binary_body(image_input(13), element(b"hello you")), 415,
                                   "inputs[image].data[0]: The data is not an image"),
    "wrong_datatype": (lambda: binary_body(image_input(len(PNG) + 4, datatype="FP32"), element(PNG)), 400,
                       'must have datatype "BYTES"'),
    "binary_size_negative": (lambda: binary_body(image_input(-4), b""), 400, "must be a non-negative integer"),
    "binary_size_without_the_header": (lambda: ({"body": json.dumps(image_input(4)).encode()}, V2), 400,
                                       "no Inference-Header-Content-Length header"),
    "data_and_binary_size": (lambda: binary_body({"inputs": [{**image_input(4)["inputs"][0], "data": ["x"]}]}, element(b"")),
                             400, 'both "data" and "binary_data_size"'),
    "binary_data_output_not_a_boolean": (lambda: binary_body(image_input(len(PNG) + 4, parameters={"binary_data_output": "yes"}),
                                                             element(PNG)), 400, '"binary_data_output" must be true or false'),
    "shape_zero": (lambda: binary_body(image_input(0, shape=(0,)), b""), 400, "holds no image"),
    "over_max_instances": (lambda: binary_body(image_input(65 * (len(PNG) + 4), shape=(65,)), element(PNG) * 65), 400,
                           "the limit is 64"),
    "compressed_body": (lambda: ({"body": b"\x1f\x8b\x08\x00"}, {**V2, "Content-Encoding": "gzip"}), 415, "send it uncompressed"),
    "json_header_is_a_list": (lambda: ({"body": b"[1]"}, {**V2, "Inference-Header-Content-Length": "3"}), 400,
                              "must be a JSON object; got list"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_binary_requests_get_a_4xx_in_the_v2_shape_alone(tiny_handler, name):
    make, status, fragment = MALFORMED[name]
    handler, ctx = tiny_handler
    good = triton_request(image(7), outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
    statuses, bodies = run_batch(handler, ctx, [good, make(), good])
    assert statuses == [200, status, 200], bodies[1]
    assert set(bodies[1]) == {"error"} and fragment in bodies[1]["error"], bodies[1]
    assert bodies[0] == bodies[2]


def test_encode_tensor_is_what_the_client_decodes():
    result = httpclient.InferResult.from_response_body(*_encoded({"b": ("BYTES", ["a", "é"]), "i": ("INT64", [3, -1]),
                                                                 "f": ("FP32", [0.5, None]), "t": ("BOOL", [True, False])}))
    assert [x.decode() for x in result.as_numpy("b")] == ["a", "é"]
    assert result.as_numpy("i").tolist() == [3, -1] and result.as_numpy("t").tolist() == [True, False]
    f = result.as_numpy("f")
    assert f[0] == 0.5 and np.isnan(f[1])


def _encoded(columns: dict) -> tuple[bytes, bool, int]:
    raw = [v2.encode_tensor(dt, values) for dt, values in columns.values()]
    header = json.dumps({"outputs": [{"name": n, "datatype": dt, "shape": [len(values)],
                                      "parameters": {"binary_data_size": len(r)}}
                                     for (n, (dt, values)), r in zip(columns.items(), raw)]}).encode()
    return header + b"".join(raw), False, len(header)


def test_an_image_sent_without_its_length_prefix_is_named_as_such(tiny_handler):
    handler, ctx = tiny_handler
    statuses, bodies = run_batch(handler, ctx, [binary_body(image_input(len(PNG)), PNG)])
    assert statuses == [400] and "starts like an image file, not with its length" in bodies[0]["error"]
