"""The standard Open Inference Protocol clients, unchanged, against the stack as `make serve` starts it.

NVIDIA's ``tritonclient`` (http and grpc) and the ``kserve`` package's clients, with their default
settings (tritonclient's default is the binary tensor data extension; kserve's REST client needs only
``protocol="v2"``, its own switch between KServe's two protocols), pointed at the gateway's front
door with the inference key: every call, and answers equal to ``/predictions`` for the same image.
kserve runs in its own venv (.venv/kserve-client; pyproject.toml's kserve-client extra says why).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from scripts.deploy.harness import REPO

MODEL = "fashion_cnn"
EXAMPLES = sorted((REPO / "examples").glob("*.png"))
KSERVE_PYTHON = Path(sys.prefix) / "kserve-client" / "bin" / "python"


@pytest.fixture(scope="module")
def stack(gateway):
    return gateway  # the session's stack (conftest.py): started as `make serve` starts it


@pytest.fixture(scope="module")
def usual(stack) -> dict[str, dict]:
    """/predictions' answer for every example (raw body), the reference every protocol must equal."""
    return {p.name: requests.post(f"{stack.inference}/predictions/{MODEL}", data=p.read_bytes(),
                                  headers={"Authorization": f"Bearer {stack.key()}"}, timeout=60).json()
            for p in EXAMPLES}


def images(*paths: Path) -> np.ndarray:
    return np.array([p.read_bytes() for p in paths], dtype=np.object_)


def assert_same_as_predictions(result, expected: list[dict]) -> None:
    """label, class index, confidence, OOD flag and score equal /predictions' (FP32 of its rounded numbers)."""
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == [e["label"] for e in expected]
    assert result.as_numpy("class_index").tolist() == [e["class_index"] for e in expected]
    assert result.as_numpy("out_of_distribution").tolist() == [e["out_of_distribution"] for e in expected]
    assert result.as_numpy("uncertain").tolist() == [e["uncertain"] for e in expected]
    # batches of different sizes may move a probability's 6th decimal (tests/conftest.py: same_answer)
    assert np.allclose(result.as_numpy("confidence"), [e["confidence"] for e in expected], rtol=0, atol=2e-6)
    assert np.allclose(result.as_numpy("ood_score"), [e["ood_score"] for e in expected], rtol=0, atol=2e-4)


# --- tritonclient.http --------------------------------------------------------------------------------------
def test_tritonclient_http_every_call_with_default_settings(stack, usual):
    client = httpclient.InferenceServerClient(stack.inference.removeprefix("http://"))
    key = {"Authorization": f"Bearer {stack.key()}"}
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1.0")
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready(MODEL, "9.9")
    server = client.get_server_metadata(headers=key)
    assert server["name"] == "torchserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL, headers=key)
    assert meta["name"] == MODEL and meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["datatype"] == "BYTES"
    assert client.get_model_metadata(MODEL, "1.0", headers=key) == meta

    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(images(EXAMPLES[0], EXAMPLES[1]))  # the default: binary_data=True
    result = client.infer(MODEL, [tensor], headers=key, request_id="triton-1")
    assert result.get_response()["id"] == "triton-1" and result.get_response()["model_version"] == "1.0"
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])  # binary answer
    assert_same_as_predictions(result, [usual[EXAMPLES[0].name], usual[EXAMPLES[1].name]])
    assert result.as_numpy("probabilities").shape == (2, 10)
    versioned = client.infer(MODEL, [tensor], model_version="1.0", headers=key)
    assert_same_as_predictions(versioned, [usual[EXAMPLES[0].name], usual[EXAMPLES[1].name]])

    # errors arrive in the v2 shape, so the client shows the message that says what to do
    with pytest.raises(InferenceServerException, match="Send the service credential") as no_key:
        client.infer(MODEL, [tensor])
    assert no_key.value.status() == "401"
    with pytest.raises(InferenceServerException, match="No such model") as unknown:
        client.infer("no_such_model", [tensor], headers=key)
    assert unknown.value.status() == "404"
    bad = httpclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"%PDF-1.7 not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"inputs\[image\]\.data\[0\]: .*PDF") as refused:
        client.infer(MODEL, [bad], headers=key)
    assert refused.value.status() == "415"


# --- tritonclient.grpc --------------------------------------------------------------------------------------
def test_tritonclient_grpc_every_call_with_default_settings(stack, usual):
    client = grpcclient.InferenceServerClient(stack.grpc)
    key = {"authorization": f"Bearer {stack.key()}"}  # gRPC metadata keys are lower case
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1.0")
    server = client.get_server_metadata(headers=key)
    assert server.name == "torchserve" and "binary_tensor_data" in server.extensions
    meta = client.get_model_metadata(MODEL, headers=key)
    assert meta.name == MODEL and meta.inputs[0].name == "image" and list(meta.versions) == ["1.0"]

    tensor = grpcclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(images(EXAMPLES[2], EXAMPLES[3]))
    result = client.infer(MODEL, [tensor], headers=key, request_id="grpc-1")
    assert result.get_response().id == "grpc-1" and result.get_response().model_version == "1.0"
    assert_same_as_predictions(result, [usual[EXAMPLES[2].name], usual[EXAMPLES[3].name]])
    assert result.as_numpy("probabilities").shape == (2, 10)

    import grpc

    for call, code, says in [
        (lambda: client.infer(MODEL, [tensor]), grpc.StatusCode.UNAUTHENTICATED, "Send the service credential"),
        (lambda: client.infer("no_such_model", [tensor], headers=key), grpc.StatusCode.NOT_FOUND, "No such model"),
        (lambda: client.is_model_ready(MODEL, "9.9"), grpc.StatusCode.NOT_FOUND, "version '9.9'"),
    ]:
        with pytest.raises(InferenceServerException, match=says) as refused:
            call()
        assert refused.value.status() == str(code), refused.value


# --- kserve (its own venv) ----------------------------------------------------------------------------------
KSERVE_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    base, grpc_target, key, model, *paths = sys.argv[1:]
    data = np.array([open(p, "rb").read() for p in paths], dtype=np.object_)

    def request():
        tensor = InferInput("image", [len(paths)], "BYTES")
        tensor.set_data_from_numpy(data)  # the default: binary_data=True
        return InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-1")

    def outputs(response):
        return {o.name: [x.decode() if isinstance(x, bytes) else x for x in o.as_numpy().tolist()]
                for o in response.outputs}

    async def main():
        rest = InferenceRESTClient(RESTConfig(protocol="v2"))
        out = {"rest": {"live": await rest.is_server_live(base), "ready": await rest.is_server_ready(base),
                        "model_ready": await rest.is_model_ready(base, model),
                        "other_model_ready": await rest.is_model_ready(base, "no_such_model")}}
        response = await rest.infer(base, request(), model_name=model, headers={"Authorization": f"Bearer {key}"})
        out["rest"]["infer"] = outputs(response)
        try:
            await rest.infer(base, request(), model_name=model)
        except Exception as exc:
            out["rest"]["no_key"] = str(exc)
        grpc = InferenceGRPCClient(grpc_target)
        meta = (("authorization", f"Bearer {key}"),)
        out["grpc"] = {"live": await grpc.is_server_live(), "ready": await grpc.is_server_ready(),
                       "model_ready": await grpc.is_model_ready(model)}
        out["grpc"]["infer"] = outputs(await grpc.infer(request(), headers=meta))
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_kserve_clients_every_call_with_default_settings(stack, usual):
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: `make install` (scripts/setup_env.sh) creates it")
    paths = [EXAMPLES[4], EXAMPLES[5]]
    run = subprocess.run([str(KSERVE_PYTHON), "-c", KSERVE_SCRIPT, stack.inference, stack.grpc, stack.key(), MODEL,
                          *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    rest, grpc = out["rest"], out["grpc"]
    assert rest["live"] and rest["ready"] and rest["model_ready"] and not rest["other_model_ready"]
    assert "401" in rest["no_key"] and "Send the service credential" in rest["no_key"]
    assert grpc["live"] and grpc["ready"] and grpc["model_ready"]
    expected = [usual[p.name] for p in paths]
    for answer in (rest["infer"], grpc["infer"]):
        assert answer["label"] == [e["label"] for e in expected] and answer["class_index"] == [e["class_index"] for e in expected]
        assert answer["out_of_distribution"] == [e["out_of_distribution"] for e in expected]
        assert np.allclose(answer["confidence"], [e["confidence"] for e in expected], atol=2e-6)
        assert np.allclose(answer["ood_score"], [e["ood_score"] for e in expected], atol=2e-4)


# --- 16 at once, some invalid -------------------------------------------------------------------------------
def bad_image(i: int) -> bytes:
    return EXAMPLES[i % len(EXAMPLES)].read_bytes()[:120] if i % 8 == 3 else b"GIF89a but not really" * 3


def test_sixteen_concurrent_binary_requests_some_invalid_are_answered_one_by_one(stack, usual):
    """tritonclient's binary requests over HTTP and gRPC at once (with batching on): each is answered alone,
    the valid ones exactly as /predictions answers their image, the invalid ones with their own error."""
    http = httpclient.InferenceServerClient(stack.inference.removeprefix("http://"), concurrency=16)
    grpc = grpcclient.InferenceServerClient(stack.grpc)
    key = f"Bearer {stack.key()}"
    invalid = {i for i in range(16) if i % 4 == 3}

    def payload(i: int) -> np.ndarray:
        return np.array([bad_image(i) if i in invalid else EXAMPLES[i % len(EXAMPLES)].read_bytes()], dtype=np.object_)

    pending = []
    for i in range(16):
        tensor = httpclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(payload(i))
        pending.append(http.async_infer(MODEL, [tensor], request_id=f"http-{i}", headers={"Authorization": key}))

    def grpc_call(i: int):
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(payload(i))
        try:
            return grpc.infer(MODEL, [tensor], request_id=f"grpc-{i}", headers={"authorization": key})
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(16) as pool:
        grpc_results = list(pool.map(grpc_call, range(16)))
    http_results = []
    for request in pending:
        try:
            http_results.append(request.get_result())
        except InferenceServerException as exc:
            http_results.append(exc)

    for kind, results in (("http", http_results), ("grpc", grpc_results)):
        for i, result in enumerate(results):
            if i in invalid:
                assert isinstance(result, InferenceServerException), (kind, i)
                assert result.status() in ("400", "415", "StatusCode.INVALID_ARGUMENT"), (kind, i, result)
                assert "inputs[image].data[0]" in result.message(), (kind, i, result.message())
                continue
            assert not isinstance(result, InferenceServerException), (kind, i, result)
            response = result.get_response()
            assert (response["id"] if kind == "http" else response.id) == f"{kind}-{i}"
            assert_same_as_predictions(result, [usual[EXAMPLES[i % len(EXAMPLES)].name]])
    http.close()
    grpc.close()
    # every one went through the gateway's REST v2 route (the gRPC ones turned into REST by the gRPC service)
    entries = [e for e in stack.access_log() if e["uri"] == f"/v2/models/{MODEL}/infer"]
    assert len(entries) >= 32


def test_a_killed_grpc_service_is_restarted_and_serves_again(stack):
    """kill -9 of the gRPC service (runs last in this module: the session's stack is shared): the supervisor
    restarts it within seconds, counts it, and gRPC calls are answered again; REST never noticed."""
    import os
    import signal
    import time

    before = stack.state()["grpc_pid"]
    os.kill(before, signal.SIGKILL)
    client = grpcclient.InferenceServerClient(stack.grpc)
    deadline, ready, now = time.monotonic() + 30, False, before
    # Ready again, answered by a new process (the supervisor writes its state after the restart: wait for both).
    while time.monotonic() < deadline and not (ready and now not in (None, before)):
        try:
            ready = client.is_server_ready()
        except InferenceServerException:
            ready = False
        now = stack.state()["grpc_pid"]
        time.sleep(0.5)
    assert ready, "the gRPC service did not come back within 30 s"
    assert now not in (None, before), (before, now)
    metrics = requests.get(f"{stack.metrics}/metrics", timeout=30).text
    assert "gateway_grpc_restarts_total 1" in metrics
    assert requests.get(f"{stack.inference}/v2/health/ready", timeout=30).json() == {"ready": True}
