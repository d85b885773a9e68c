"""The input corpus for the Open Inference Protocol's binary form and gRPC, through the front door.

Malformed binary v2 requests (wrong lengths in the binary header, truncated bodies, wrong datatypes,
oversized messages, ...) over REST, and malformed gRPC calls to KServe's service: each gets the
4xx (v2 shape, ``{"error": ...}``) or gRPC status of a client error, never a 5xx, never INTERNAL,
UNAVAILABLE or UNKNOWN, and the workers that served before serve after.
"""

from __future__ import annotations

import json
import struct

import grpc
import pytest
import requests
from tritonclient.grpc import service_pb2 as pb

from scripts.deploy.harness import EXAMPLE

MODEL = "fashion_cnn"
PNG = EXAMPLE.read_bytes()
LIMIT = 10 * 2**20  # config.properties' max_request_size, which the gateway enforces


@pytest.fixture(scope="module")
def stack(gateway):
    return gateway  # the session's stack (conftest.py): started as `make serve` starts it


@pytest.fixture(scope="module")
def workers(stack):
    """The workers before the corpus runs (they must be the same after it)."""
    return {(w["id"], w["pid"]) for w in stack.client().describe(MODEL)[0]["workers"]}


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def body(header: dict, tail: bytes, length: int | None = None) -> dict:
    """A binary v2 request: the JSON header, then ``tail``; Inference-Header-Content-Length ``length`` or the true one."""
    data = json.dumps(header).encode()
    return {"data": data + tail, "headers": {"Inference-Header-Content-Length": str(len(data) if length is None else length)}}


def image_input(size: int, shape=(1,), datatype="BYTES", **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": list(shape),
                        "parameters": {"binary_data_size": size}}], **extra}


GOOD = image_input(len(PNG) + 4)
# name -> (request, expected status, a fragment of the error)
REST = {
    "header_length_over_the_body": (lambda: body(GOOD, element(PNG), length=10**6), 400, "Inference-Header-Content-Length is '1000000'"),
    "header_length_zero": (lambda: body(GOOD, element(PNG), length=0), 400, "must be the length in bytes of the JSON header"),
    "header_length_negative": (lambda: body(GOOD, element(PNG), length=-5), 400, "must be the length in bytes"),
    "header_length_not_a_number": (lambda: {**body(GOOD, element(PNG)), "headers": {"Inference-Header-Content-Length": "12a"}},
                                   400, "must be the length in bytes"),
    "header_length_cuts_the_json": (lambda: body(GOOD, element(PNG), length=20), 400, "is not valid JSON"),
    "header_length_takes_binary_bytes": (lambda: body(GOOD, element(PNG), length=len(json.dumps(GOOD)) + 3), 400,
                                         "is not valid JSON"),
    "truncated_body": (lambda: body(GOOD, element(PNG)[: len(PNG) // 2]), 400, f"add up to {len(PNG) + 4}"),
    "extra_bytes_after_the_tensors": (lambda: body(GOOD, element(PNG) + b"\0" * 16), 400, f"add up to {len(PNG) + 4}"),
    "element_length_over_the_tensor": (lambda: body(GOOD, struct.pack("<I", len(PNG) + 1) + PNG), 400, "only"),
    "element_length_prefix_missing": (lambda: body(image_input(len(PNG)), PNG), 400, "starts like an image file, not with its length"),
    "element_length_prefix_cut": (lambda: body(image_input(len(PNG) + 6), element(PNG) + b"\0\0"), 400, "4-byte length"),
    "more_elements_than_the_shape": (lambda: body(image_input(2 * len(PNG) + 8), element(PNG) * 2), 400, 'but "shape" says 1'),
    "wrong_datatype_fp32": (lambda: body(image_input(len(PNG) + 4, datatype="FP32"), element(PNG)), 400, 'datatype "BYTES"'),
    "wrong_datatype_uint8": (lambda: body(image_input(len(PNG), datatype="UINT8", shape=(len(PNG),)), PNG), 400, 'datatype "BYTES"'),
    "binary_size_not_an_integer": (lambda: body(image_input("12"), b""), 400, "non-negative integer"),
    "binary_size_without_the_header": (lambda: {"data": json.dumps(GOOD).encode() + element(PNG)}, 400,
                                       "no Inference-Header-Content-Length header"),
    "binary_data_output_not_a_boolean": (lambda: body(image_input(len(PNG) + 4, parameters={"binary_data_output": 1}),
                                                      element(PNG)), 400, '"binary_data_output" must be true or false'),
    "truncated_image_in_the_element": (lambda: body(image_input(304), element(PNG[:300])), 400, "inputs[image].data[0]"),
    "text_in_the_element": (lambda: body(image_input(9), element(b"hello")), 415, "inputs[image].data[0]"),
    "json_header_not_utf8": (lambda: {"data": b"\xff\xfe{}" + element(PNG), "headers": {"Inference-Header-Content-Length": "4"}},
                             400, "is not valid JSON"),
    "compressed_body": (lambda: {**body(GOOD, element(PNG)), "headers": {**body(GOOD, b"")["headers"], "Content-Encoding": "gzip"}},
                        415, "send it uncompressed"),
    "unknown_output": (lambda: body(image_input(len(PNG) + 4, outputs=[{"name": "logits"}]), element(PNG)), 400, "Unknown outputs"),
    "over_the_body_limit": (lambda: body(image_input(LIMIT + 4), element(PNG + b"\0" * (LIMIT - len(PNG)))), 413, "over the limit"),
    "unknown_model": (lambda: {**body(GOOD, element(PNG)), "model": "no_such_model"}, 404, "No such model"),
    "unknown_version": (lambda: {**body(GOOD, element(PNG)), "model": f"{MODEL}/versions/9.9"}, 404, "No such model"),
    "wrong_key": (lambda: {**body(GOOD, element(PNG)), "key": "Bearer wrong"}, 401, "Send the service credential"),
}


def post(stack, case: dict) -> requests.Response:
    headers = {"Authorization": case.get("key", f"Bearer {stack.key()}"), **case.get("headers", {})}
    url = f"{stack.inference}/v2/models/{case.get('model', MODEL)}/infer"
    return requests.post(url, data=case["data"], headers=headers, timeout=60)


def test_a_binary_body_labelled_json_is_still_read_as_binary(stack):
    resp = post(stack, {**body(GOOD, element(PNG)), "headers": {**body(GOOD, b"")["headers"],
                                                                "Content-Type": "application/json"}})
    assert resp.status_code == 200, resp.text
    assert {o["name"]: o["data"] for o in resp.json()["outputs"]}["label"] == ["Ankle boot"]


@pytest.mark.parametrize("name", REST)
def test_malformed_binary_v2_gets_a_4xx_in_the_v2_shape(stack, workers, name):
    make, status, fragment = REST[name]
    resp = post(stack, make())
    assert resp.status_code == status, (resp.status_code, resp.text[:400])
    assert resp.headers["Content-Type"].startswith("application/json")
    doc = resp.json()
    assert set(doc) == {"error"} and fragment in doc["error"], doc


# --- gRPC ---------------------------------------------------------------------------------------------------
def infer_request(model: str = MODEL, datatype: str = "BYTES", shape=(1,), raw=None, contents=None, **params):
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.extend(raw)
    if contents is not None:
        tensor.contents.bytes_contents.extend(contents)
    for name, value in params.items():
        request.parameters[name].CopyFrom(value)
    return request


C = grpc.StatusCode
GRPC = {  # name -> (method, message bytes, expected status, a fragment of the details)
    "bytes_that_are_no_message": ("ModelInfer", lambda: b"\xff\xff\xff\x01 not protobuf", C.INVALID_ARGUMENT, "could not be read"),
    "raw_element_length_over_the_data": ("ModelInfer", lambda: infer_request(raw=[struct.pack("<I", len(PNG) + 9) + PNG]),
                                         C.INVALID_ARGUMENT, "only"),
    "raw_without_length_prefix": ("ModelInfer", lambda: infer_request(raw=[PNG]), C.INVALID_ARGUMENT, "not with its length"),
    "raw_entries_not_one_per_input": ("ModelInfer", lambda: infer_request(raw=[element(PNG)] * 2), C.INVALID_ARGUMENT,
                                      "one entry per input"),
    "wrong_datatype": ("ModelInfer", lambda: infer_request(datatype="FP32", contents=[PNG]), C.INVALID_ARGUMENT, '"BYTES"'),
    "shape_says_two": ("ModelInfer", lambda: infer_request(shape=(2,), contents=[PNG]), C.INVALID_ARGUMENT, '"shape" says 2'),
    "no_image": ("ModelInfer", lambda: infer_request(contents=[]), C.INVALID_ARGUMENT, 'holds 0 elements'),
    "not_an_image": ("ModelInfer", lambda: infer_request(contents=[b"%PDF-1.7"]), C.INVALID_ARGUMENT, "PDF"),
    "truncated_image": ("ModelInfer", lambda: infer_request(contents=[PNG[:200]]), C.INVALID_ARGUMENT, "truncated"),
    "bad_top_k": ("ModelInfer", lambda: infer_request(contents=[PNG], top_k=pb.InferParameter(int64_param=99)),
                  C.INVALID_ARGUMENT, "from 1 to 10"),
    "bad_tta": ("ModelInfer", lambda: infer_request(contents=[PNG], tta=pb.InferParameter(string_param="sometimes")),
                C.INVALID_ARGUMENT, "tta"),
    "no_model_named": ("ModelInfer", lambda: infer_request(model="", contents=[PNG]), C.INVALID_ARGUMENT, "names no model"),
    "unknown_model": ("ModelInfer", lambda: infer_request(model="no_such_model", contents=[PNG]), C.NOT_FOUND, "No such model"),
    "model_name_with_a_path": ("ModelInfer", lambda: infer_request(model="../etc", contents=[PNG]), C.NOT_FOUND, "is served here"),
    "oversized_message": ("ModelInfer", lambda: infer_request(contents=[PNG + b"\0" * (LIMIT + 2**17)]), C.RESOURCE_EXHAUSTED, ""),
    "unknown_model_metadata": ("ModelMetadata", lambda: pb.ModelMetadataRequest(name="no_such_model"), C.NOT_FOUND, "No such model"),
    "unknown_model_ready": ("ModelReady", lambda: pb.ModelReadyRequest(name="no_such_model"), C.NOT_FOUND, "no_such_model"),
    "a_call_kserve_does_not_define": ("RepositoryIndex", lambda: pb.RepositoryIndexRequest(), C.UNIMPLEMENTED, "GRPCInferenceService"),
}


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.grpc, options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
        yield ch


def call(channel, method: str, message, metadata) -> grpc.RpcError | bytes:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    try:
        return channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(data, metadata=metadata, timeout=60)
    except grpc.RpcError as exc:
        return exc


@pytest.mark.parametrize("name", GRPC)
def test_malformed_grpc_gets_the_status_of_a_client_error(stack, channel, workers, name):
    method, make, code, fragment = GRPC[name]
    got = call(channel, method, make(), (("authorization", f"Bearer {stack.key()}"),))
    assert isinstance(got, grpc.RpcError), f"{name}: answered"
    assert got.code() == code and fragment in got.details(), (got.code(), got.details())
    assert got.code() not in (C.INTERNAL, C.UNAVAILABLE, C.UNKNOWN)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "wrong"),)])
def test_grpc_without_the_credential_is_unauthenticated_before_its_message_is_read(stack, channel, metadata):
    got = call(channel, "ModelInfer", infer_request(contents=[PNG]), metadata)
    assert isinstance(got, grpc.RpcError) and got.code() == C.UNAUTHENTICATED, got
    assert "authorization: Bearer <key>" in got.details()


def test_afterwards_the_same_workers_answer_the_known_image(stack, channel, workers):
    got = call(channel, "ModelInfer", infer_request(contents=[PNG]), (("authorization", f"Bearer {stack.key()}"),))
    answer = pb.ModelInferResponse.FromString(got)
    labels = answer.raw_output_contents[[o.name for o in answer.outputs].index("label")]
    assert labels[4:] == b"Ankle boot"
    assert {(w["id"], w["pid"]) for w in stack.client().describe(MODEL)[0]["workers"]} == workers
