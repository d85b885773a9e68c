"""The gateway in front of a real TorchServe, started as `make serve` starts it.

Every common client spelling gets an answer; credentials, limits and the worker cap are
enforced before TorchServe sees anything; nothing a client sends produces a 5xx or an
echo of its bytes; readiness says whether a prediction can be served now.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import requests

from scripts.deploy.harness import REPO

COAT = REPO / "examples" / "coat.png"
MODEL = "fashion_cnn"


@pytest.fixture(scope="module")
def stack(gateway):
    return gateway  # the session's stack (conftest.py): started as `make serve` starts it


def predictions(stack) -> str:
    return f"{stack.inference}/predictions/{MODEL}"


def auth(stack, kind: str = "inference") -> dict:
    return {"Authorization": f"Bearer {stack.key(kind)}"}


def curl(*args: str) -> tuple[int, str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the curl spellings cannot be tried (apt-get install curl)")
    out = subprocess.run(["curl", "-s", "-S", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


# --- every client spelling -----------------------------------------------------------------------
def test_every_common_client_spelling_gets_the_answer(stack, tmp_path):
    url, hdr = predictions(stack), f"Authorization: Bearer {stack.key()}"
    as_json = tmp_path / "coat.json"
    as_json.write_text(json.dumps({"image": base64.b64encode(COAT.read_bytes()).decode()}))
    answers = {
        "curl --data-binary": curl("-H", hdr, "--data-binary", f"@{COAT}", url),
        "curl -d (JSON)": curl("-H", hdr, "-d", f"@{as_json}", url),
        "curl -T": curl("-H", hdr, "-T", str(COAT), url),
        "curl -F": curl("-H", hdr, "-F", f"data=@{COAT}", url),
        "curl -F file=": curl("-H", hdr, "-F", f"file=@{COAT}", url),
    }
    req = urllib.request.Request(url, data=COAT.read_bytes(), headers={"Authorization": f"Bearer {stack.key()}"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # urllib's default: x-www-form-urlencoded
        answers["urllib"] = (resp.status, resp.read().decode())
    for name, resp in {
        "requests data=": requests.post(url, data=COAT.read_bytes(), headers=auth(stack), timeout=60),
        "requests files=": requests.post(url, files={"data": COAT.open("rb")}, headers=auth(stack), timeout=60),
        "requests json=": requests.post(url, json={"image": base64.b64encode(COAT.read_bytes()).decode()},
                                        headers=auth(stack), timeout=60),
    }.items():
        answers[name] = (resp.status_code, resp.text)
    for name, (status, body) in answers.items():
        assert status == 200, f"{name}: {status} {body[:300]}"
        assert json.loads(body)["label"] == "Coat", name


# --- credentials ---------------------------------------------------------------------------------
def test_missing_wrong_and_misplaced_credentials_are_refused_with_json(stack):
    url = predictions(stack)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": stack.key()}, auth(stack, "management")):
        resp = requests.post(url, data=COAT.read_bytes(), headers=headers, timeout=30)
        assert resp.status_code == 401 and resp.json()["type"] == "Unauthorized", (headers, resp.text)
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    resp = requests.get(f"{stack.management}/models", headers=auth(stack, "inference"), timeout=30)
    assert resp.status_code == 401 and "management key" in resp.json()["message"]
    assert requests.get(f"{stack.management}/models", headers=auth(stack, "management"), timeout=30).status_code == 200


def test_service_keys_hold_at_least_128_bits_and_differ(stack):
    keys = [stack.key("inference"), stack.key("management")]
    assert keys[0] != keys[1]
    for key in keys:
        assert len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) >= 16


def test_torchserve_itself_refuses_anyone_without_the_replica_key(stack):
    replica = stack.replica_state()[0]
    for headers in ({}, auth(stack, "inference")):  # not even the service key: only the gateway holds the replica's
        resp = requests.post(f"{replica['inference']}/predictions/{MODEL}", data=COAT.read_bytes(),
                             headers={**headers, "Content-Type": "application/octet-stream"}, timeout=30)
        assert resp.status_code in (400, 401) and "Token Authorization failed" in resp.text, resp.text
        resp = requests.get(f"{replica['management']}/models", headers=headers, timeout=30)
        assert resp.status_code in (400, 401), resp.text
    keys = (stack.run_dir / "replica-0" / "key_file.json")
    assert keys.exists() and (stack.run_dir.stat().st_mode & 0o077) == 0 and (stack.run_dir / "nginx.conf").stat().st_mode & 0o077 == 0


def test_the_credential_is_checked_before_the_body_is_read(stack):
    """An unauthenticated 9 MB upload is refused from its headers: the body is never waited for."""
    with socket.create_connection(("127.0.0.1", stack.ports[0]), timeout=10) as sock:
        sock.sendall(f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {9 * 2**20}\r\n\r\n".encode())
        sock.sendall(b"\0" * 1024)  # 1 KiB of the 9 MiB promised
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 401"), answer[:200]


def test_repeated_failures_from_one_client_are_rate_limited_not_the_right_key(stack):
    url = predictions(stack)
    statuses = [requests.post(url, data=b"x", headers={"Authorization": "Bearer guess"}, timeout=30) for _ in range(40)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    assert {r.status_code for r in statuses} <= {401, 429}
    assert int(limited[0].headers["Retry-After"]) > 0 and limited[0].json()["type"] == "TooManyRequests"
    assert requests.post(url, data=COAT.read_bytes(), headers=auth(stack), timeout=60).status_code == 200


# --- what is served where ----------------------------------------------------------------------------
def test_the_workflow_api_token_api_and_openapi_description_are_closed(stack):
    m = auth(stack, "management")
    resp = requests.post(f"{stack.management}/workflows", params={"url": "file:///tmp/x.war"}, headers=m, timeout=30)
    assert resp.status_code == 403 and "workflow" in resp.json()["message"]
    assert requests.get(f"{stack.management}/workflows", headers=m, timeout=30).status_code == 403
    assert requests.get(f"{stack.management}/token", params={"type": "inference"}, headers=m, timeout=30).status_code == 403
    assert requests.get(f"{stack.management}/api-description", headers=m, timeout=30).status_code == 403
    for path in ("/api-description", "/metrics", "/", "/models"):
        resp = requests.get(f"{stack.inference}{path}", headers=auth(stack), timeout=30)
        assert resp.status_code == 404 and resp.json()["type"] == "NotFound", path
    assert requests.options(f"{stack.inference}/", timeout=30).status_code == 404


def test_metrics_port_serves_every_replica_labelled_and_nothing_else(stack):
    text = requests.get(f"{stack.metrics}/metrics", timeout=30).text
    assert 'replica="0"' in text and "gateway_replica_ready" in text and "gateway_worker_cap" in text
    assert requests.get(f"{stack.metrics}/predictions/{MODEL}", timeout=30).status_code == 404


def test_what_clients_were_answered_is_counted_from_the_access_log(stack):
    def answered(code: str) -> float:
        text = requests.get(f"{stack.metrics}/metrics", timeout=30).text
        hit = re.search(rf'^gateway_http_responses_total{{api="inference",code="{code}"}} (\S+)$', text, re.M)
        return float(hit.group(1)) if hit else 0.0

    before = answered("200"), answered("404")
    assert requests.post(predictions(stack), data=COAT.read_bytes(), headers=auth(stack), timeout=60).status_code == 200
    assert requests.get(f"{stack.inference}/nothing-here", timeout=30).status_code == 404
    wait_for(lambda: answered("200") >= before[0] + 1 and answered("404") >= before[1] + 1, 15,
             "the supervisor to count the new answers")


def test_request_id_is_echoed_and_logged_with_upstream_and_retries(stack):
    resp = requests.post(predictions(stack), data=COAT.read_bytes(), headers={**auth(stack), "X-Request-ID": "abc-123"}, timeout=60)
    assert resp.headers["X-Request-ID"] == "abc-123"
    fresh = requests.post(predictions(stack), data=COAT.read_bytes(), headers=auth(stack), timeout=60)
    assert len(fresh.headers["X-Request-ID"]) == 32
    assert requests.get(f"{stack.inference}/nope", timeout=30).headers["X-Request-ID"]
    time.sleep(0.5)
    entry = next(e for e in reversed(stack.access_log()) if e["request_id"] == "abc-123")
    assert entry["status"] == 200 and "replica-0.sock" in entry["upstream"] and entry["retries"] == 0
    assert float(entry["upstream_time"]) > 0 and entry["uri"] == f"/predictions/{MODEL}"


# --- nothing a client sends gives a 5xx or echoes its bytes -----------------------------------------------
@pytest.mark.parametrize("body,headers", [
    (b"=%zz", {"Content-Type": "application/x-www-form-urlencoded"}),
    (b"=%zz", {}),
    (b"", {}),
    (b"\x00" * 64, {"Content-Type": "text/plain"}),
    (b"--x\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nzz", {"Content-Type": "multipart/form-data; boundary=x"}),
    (b"{\"image\": 12", {"Content-Type": "application/json"}),
    (b"%zz-secret-bytes", {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}),
])
def test_malformed_bodies_get_a_4xx_that_does_not_echo_them(stack, body, headers):
    resp = requests.post(predictions(stack), data=body, headers={**auth(stack), **headers}, timeout=60)
    assert 400 <= resp.status_code < 500, resp.text
    if len(body) > 3:
        assert body.decode(errors="ignore")[-6:] not in resp.text


def test_bodies_over_the_limit_are_refused_with_413_json(stack):
    resp = requests.post(predictions(stack), data=b"\0" * (10 * 2**20 + 1), headers=auth(stack), timeout=60)
    assert resp.status_code == 413 and resp.json()["type"] == "PayloadTooLarge"


def _held_uploads(stack, count: int, size: int) -> list[socket.socket]:
    """``count`` uploads of ``size`` bytes whose headers and first megabyte are sent: in flight, body still coming."""
    head = (f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.key()}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n").encode()
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", stack.ports[0]), timeout=30)
        sock.sendall(head + b"\0" * 2**20)
        held.append(sock)
    return held


def _finish(held: list[socket.socket], size: int) -> None:
    """Send the rest of each held upload: each is answered (not an image: 415), none lost."""
    for sock in held:
        sock.sendall(b"\0" * (size - 2**20))
    for sock in held:
        assert sock.recv(4096).startswith(b"HTTP/1.1 415"), "a held upload got no answer"


def test_large_bodies_beyond_the_limit_in_flight_get_503_with_retry_after(stack):
    """Four large uploads (4 MB or more) may be in flight; a fifth is answered at once, before its body is read,
    while phone-photo-sized uploads (1-4 MB) and small requests still pass."""
    size = 9 * 2**20
    held = []
    try:
        held = _held_uploads(stack, 4, size)
        time.sleep(0.5)
        resp = requests.post(predictions(stack), data=b"\0" * (5 * 2**20), headers=auth(stack), timeout=30)
        assert resp.status_code == 503 and resp.json()["type"] == "ServiceUnavailable", resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        photo = requests.post(predictions(stack), data=b"\0" * (3 * 2**20), headers=auth(stack), timeout=30)
        assert photo.status_code == 415  # its own class: answered by the handler (not an image)
        small = requests.post(predictions(stack), data=COAT.read_bytes(), headers=auth(stack), timeout=60)
        assert small.status_code == 200  # small requests are not held up
        _finish(held, size)
    finally:
        for sock in held:
            sock.close()


def test_phone_photo_bodies_have_sixteen_slots_of_their_own(stack):
    """Phone photos are 1-4 MB: sixteen may be in flight at once (docs/security.md: within what a frontend
    holds); the seventeenth gets 503 + Retry-After before its body is read."""
    size = 3 * 2**20
    held = []
    try:
        held = _held_uploads(stack, 16, size)
        time.sleep(0.5)
        resp = requests.post(predictions(stack), data=b"\0" * (2 * 2**20), headers=auth(stack), timeout=30)
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1, resp.text
        _finish(held, size)
    finally:
        for sock in held:
            sock.close()


def test_thousands_of_idle_connections_do_not_stall_real_requests(stack):
    idle = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", stack.ports[0]), timeout=10))
        resp = requests.post(predictions(stack), data=COAT.read_bytes(), headers=auth(stack), timeout=30)
        assert resp.status_code == 200
    finally:
        for sock in idle:
            sock.close()


# --- the worker cap, and readiness that does not lie ------------------------------------------------------
@pytest.mark.parametrize("query", [
    {"min_worker": "1000", "max_worker": "1000"}, {"min_worker": "1000"}, {"max_worker": "9999999999"},
    {"min_worker": "-1"}, {"min_worker": "two"}, {"min_worker": "0"}, {"min_worker": "1", "max_worker": "0"},
])
def test_scaling_beyond_the_cap_or_to_zero_is_refused_before_torchserve(stack, query):
    cap = requests.get(f"{stack.management}/replicas", headers=auth(stack, "management"), timeout=30).json()["capacity"]
    for path in (f"/models/{MODEL}", f"/replicas/0/models/{MODEL}"):
        resp = requests.put(f"{stack.management}{path}", params=query, headers=auth(stack, "management"), timeout=30)
        assert resp.status_code == 400 and resp.json()["type"] == "WorkerLimit", resp.text
        assert f"1 to {cap['cap']}" in resp.json()["message"] and "force=true" in resp.json()["message"]
    workers = requests.get(f"{stack.management}/models/{MODEL}", headers=auth(stack, "management"), timeout=30).json()[0]
    assert len(workers["workers"]) <= cap["cap"]


def test_ctl_scale_applies_the_same_cap(stack):
    cap = requests.get(f"{stack.management}/replicas", headers=auth(stack, "management"), timeout=30).json()["capacity"]["cap"]
    config = stack.root / "ctl.properties"
    config.write_text(f"inference_address={stack.inference}\nmanagement_address={stack.management}\n"
                      f"metrics_address={stack.metrics}\n")
    ctl = [sys.executable, "-m", "scripts.ops.ctl", "scale", MODEL, "--config", str(config), "--workdir", str(stack.root)]
    refused = subprocess.run([*ctl, "--workers", str(cap + 1)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and f"1 to {cap}" in refused.stderr
    puts = [e for e in stack.access_log() if e["method"] == "PUT" and e["status"] == 200]
    ok = subprocess.run([*ctl, "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert len([e for e in stack.access_log() if e["method"] == "PUT" and e["status"] == 200]) == len(puts) + 1


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def test_zero_workers_is_an_outage_readiness_and_status_say_so(stack):
    """TorchServe's own /ping says Healthy with 0 workers; the gateway's readiness does not."""
    m = auth(stack, "management")
    base = {"synchronous": "true", "timeout": "60"}
    resp = requests.put(f"{stack.management}/models/{MODEL}", params={**base, "min_worker": 0, "max_worker": 0, "force": "true"},
                        headers=m, timeout=90)
    try:
        assert resp.status_code == 200, resp.text
        replica = stack.replica_state()[0]
        own = requests.get(f"{replica['inference']}/ping",
                           headers={"Authorization": f"Bearer {json.loads((stack.run_dir / 'replica-0' / 'key_file.json').read_text())['inference']['key']}"},
                           timeout=10)
        assert own.json()["status"] == "Healthy"  # the lie this guards against
        wait_for(lambda: stack.ping().status_code == 503, 30, "readiness to turn 503 with 0 workers")
        assert stack.ping().json()["status"] == "Unhealthy"
        # the Open Inference Protocol's readiness says the same, over REST and gRPC (v2 clients count only 200 as ready)
        for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1.0/ready"):
            assert requests.get(f"{stack.inference}{path}", timeout=10).status_code == 503, path
        import tritonclient.grpc as grpcclient

        grpc = grpcclient.InferenceServerClient(stack.grpc)
        assert not grpc.is_server_ready() and not grpc.is_model_ready(MODEL)
        status = stack.serve("status", timeout=60)
        assert status.returncode == 1 and "NOT READY" in status.stdout, status.stdout
    finally:
        resp = requests.put(f"{stack.management}/models/{MODEL}", params={**base, "min_worker": 2, "max_worker": 2},
                            headers=m, timeout=90)
    assert resp.status_code == 200
    wait_for(lambda: stack.ping().status_code == 200, 30, "readiness back after scaling up")
    assert stack.serve("status", timeout=60).returncode == 0
    wait_for(lambda: requests.get(f"{stack.inference}/v2/models/{MODEL}/ready", timeout=10).status_code == 200, 30,
             "v2 model readiness back after scaling up")


# --- Open Inference Protocol v2, parsed by the handler so batching keeps working -------------------------
def test_v2_health_and_metadata(stack):
    assert requests.get(f"{stack.inference}/v2/health/live", timeout=30).json() == {"live": True}
    assert requests.get(f"{stack.inference}/v2/health/ready", timeout=30).json() == {"ready": True}
    assert requests.get(f"{stack.inference}/v2/models/{MODEL}/ready", timeout=30).status_code == 200
    assert requests.get(f"{stack.inference}/v2/models/{MODEL}", timeout=30).status_code == 401
    meta = requests.get(f"{stack.inference}/v2/models/{MODEL}", headers=auth(stack), timeout=30).json()
    assert meta["name"] == MODEL and meta["versions"] == ["1.0"] and meta["inputs"][0]["datatype"] == "BYTES"
    versioned = requests.get(f"{stack.inference}/v2/models/{MODEL}/versions/1.0", headers=auth(stack), timeout=30)
    assert versioned.json() == meta


def test_sixteen_concurrent_v2_requests_some_invalid_are_each_answered_alone(stack):
    """With batching on, each v2 request gets its own answer, the same as /predictions gives its image."""
    from concurrent.futures import ThreadPoolExecutor

    examples = sorted((REPO / "examples").glob("*.png"))
    usual = {p.name: requests.post(predictions(stack), data=p.read_bytes(), headers={**auth(stack), "X-Top-K": "10"},
                                   timeout=60).json() for p in examples}

    def v2_call(i: int):
        path = examples[i % len(examples)]
        data = base64.b64encode(path.read_bytes()).decode() if i % 4 != 3 else "!!not base64!!"
        doc = {"id": f"req-{i}", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}]}
        resp = requests.post(f"{stack.inference}/v2/models/{MODEL}/infer", json=doc, headers=auth(stack), timeout=60)
        return i, path.name, resp.status_code, resp.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(v2_call, range(16)))
    for i, name, status, body in results:
        if i % 4 == 3:
            assert status == 400 and "not valid base64" in body["error"], body
            continue
        assert status == 200 and body["id"] == f"req-{i}", body
        out = {o["name"]: o["data"] for o in body["outputs"]}
        expected = usual[name]
        assert out["label"] == [expected["label"]] and out["confidence"] == [expected["confidence"]]
        assert out["ood_score"] == [expected["ood_score"]]
        assert sorted(out["probabilities"], reverse=True) == pytest.approx([t["probability"] for t in expected["top_k"]], abs=1e-6)
    batched = [e for e in stack.access_log() if e["uri"].startswith("/v2/") and e["status"] == 200]
    assert batched, "no v2 request in the access log"


def over_cap(stack) -> int:
    """One worker more than the cap: what these tests ask for (survivable here if the gateway ever let it through)."""
    return requests.get(f"{stack.management}/replicas", headers=auth(stack, "management"), timeout=30).json()["capacity"]["cap"] + 1


@pytest.mark.parametrize("path_and_query", [
    "/models/{m}?MIN_WORKER=1&min_worker={n}",  # nginx reads names in any case, TorchServe exactly
    "/models/{m}?min%5Fworker={n}",  # TorchServe decodes names, nginx does not
    "/models/{m}?x=1;min_worker={n}",  # TorchServe also splits on ";"
    "/replicas/0/models/{m}?Max_Worker={n}",
])
def test_worker_counts_spelled_to_slip_past_the_cap_are_refused(stack, path_and_query):
    url = stack.management + path_and_query.format(m=MODEL, n=over_cap(stack))
    resp = requests.put(url, headers=auth(stack, "management"), timeout=30)
    assert resp.status_code == 400 and resp.json()["type"] == "WorkerLimit", resp.text


def test_an_encoded_question_mark_stays_in_the_path_and_scales_nothing(stack):
    before = requests.get(f"{stack.management}/models/{MODEL}", headers=auth(stack, "management"), timeout=30).json()
    n = over_cap(stack)
    for path in (f"/replicas/0/models/{MODEL}%3Fmin_worker%3D{n}", f"/models/{MODEL}%3Fmin_worker%3D{n}"):
        resp = requests.put(f"{stack.management}{path}", headers=auth(stack, "management"), timeout=30)
        assert 400 <= resp.status_code < 500, resp.text
    after = requests.get(f"{stack.management}/models/{MODEL}", headers=auth(stack, "management"), timeout=30).json()
    assert len(after[0]["workers"]) == len(before[0]["workers"])


def test_the_cap_is_told_only_to_holders_of_the_management_key(stack):
    resp = requests.put(f"{stack.management}/models/{MODEL}", params={"min_worker": 1000}, timeout=30)
    assert resp.status_code == 401 and "WorkerLimit" not in resp.text
