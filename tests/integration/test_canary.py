"""Gradual rollout against the real stack with two replicas (nginx gateway and hops, two TorchServes, the supervisor,
its recorder and shadow sink), as ``make serve REPLICAS=2`` starts it with the shipped configuration (model API off):

- ``rollout --stage`` loads a version beside the live one on every replica under load, losing no request and
  switching nothing;
- shadow: every client answer is byte-identical to the answer with the shadow off; both versions' answers are
  recorded side by side; a candidate frozen (SIGSTOP), killed (SIGKILL), or the shadow sink killed, costs clients
  nothing (no failure, no request waiting for the shadow);
- ``ctl compare`` gives 100 % agreement for an identical candidate, and for the fp32 model against the int8 one
  (the shipped config) exactly the agreement of the two computed in-process on the same images;
- canary at 10 %: the candidate's share of 2,000 requests within 10 % +/- 2 points;
- promote and rollback under 16 concurrent clients: zero failed requests, every replica switched.

Bounded in time: the stack starts once for the module; each load stops after its step (at most 240 s).
"""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from scripts.deploy import rollout
from scripts.deploy.harness import REPO
from scripts.ops import ctl
from scripts.ops.tsclient import parse_prometheus
from tests.conftest import run_batch, shipped_handler
from tests.integration import load
from tests.integration.stack import running_stack

MODEL = "fashion_cnn"
IMAGES = 300  # held-out images sent in each shadow pass


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Load(load.Load):
    """``threads`` clients sending the example image through the gateway."""

    def __init__(self, stack, threads: int, limit_s: float = 240.0):
        super().__init__(threads, limit_s)
        self.stack = stack
        self.body = (REPO / "examples" / "ankle_boot.png").read_bytes()

    def connect(self):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.stack.key()}"
        return session

    def send(self, session):
        return session.post(f"{self.stack.inference}/predictions/{MODEL}", data=self.body, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("canary"), replicas=2) as st:
        yield st


@pytest.fixture(scope="module")
def connection(stack) -> list[str]:
    """ctl's --config and --workdir for the stack: its public addresses, model store and service keys."""
    config = stack.root / "ctl.properties"
    config.write_text(f"inference_address={stack.inference}\nmanagement_address={stack.management}\n"
                      f"metrics_address={stack.metrics}\nmodel_store={stack.root / 'model_store'}\n")
    return ["--config", str(config), "--workdir", str(stack.root)]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """model-config.yaml for the candidates: the shipped one (an identical candidate) and the same with fp32, each
    with one worker (the machine has two cores for two replicas of three versions)."""
    folder = tmp_path_factory.mktemp("configs")
    out = {}
    for name, precision in (("same", "int8"), ("fp32", "fp32")):
        config = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
        config["minWorkers"] = config["maxWorkers"] = 1
        config["handler"]["precision"] = precision
        out[name] = folder / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(config))
    return out


@pytest.fixture(scope="module")
def images(holdout) -> list[bytes]:
    return [png(img) for img in holdout[0][:IMAGES]]


def auth(stack, kind: str = "inference") -> dict:
    return {"Authorization": f"Bearer {stack.key(kind)}"}


def replica_versions(stack) -> dict[int, dict[str, dict]]:
    out = {}
    for i in range(stack.replicas):
        described = requests.get(f"{stack.management}/replicas/{i}/models/{MODEL}/all", headers=auth(stack, "management"),
                                 timeout=30).json()
        out[i] = {d["modelVersion"]: d for d in described}
    return out


def defaults(stack) -> list[str]:
    """The default version on each replica (GET /models/<m> describes only that one)."""
    return [requests.get(f"{stack.management}/replicas/{i}/models/{MODEL}", headers=auth(stack, "management"),
                         timeout=30).json()[0]["modelVersion"] for i in range(stack.replicas)]


def send(stack, images: list[bytes], tag: str) -> list[tuple[bytes, str | None, float]]:
    """Each image alone, one after the other: (body, X-Model-Version, seconds)."""
    session = requests.Session()
    out = []
    for i, data in enumerate(images):
        started = time.perf_counter()
        resp = session.post(f"{stack.inference}/predictions/{MODEL}", data=data, timeout=60,
                            headers={**auth(stack), "X-Request-ID": f"{tag}-{i}"})
        assert resp.status_code == 200, resp.text
        out.append((resp.content, resp.headers.get("X-Model-Version"), time.perf_counter() - started))
    return out


def compare(connection, version: str, capsys) -> dict:
    capsys.readouterr()
    assert ctl.main(["compare", MODEL, version, "--json", *connection]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def metrics(stack) -> list[tuple[str, dict, float]]:
    return parse_prometheus(requests.get(f"{stack.metrics}/metrics", timeout=30).text)


def shadow_outcomes(stack, version: str) -> dict[str, float]:
    return {s["outcome"]: v for name, s, v in metrics(stack)
            if name == "shadow_requests_total" and s.get("ModelVersion") == version}


def worker_pids(stack, version: str) -> list[int]:
    return [w["pid"] for versions in replica_versions(stack).values() for w in versions[version]["workers"]]


def wait_ready(stack, version: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not all(any(w["status"] == "READY" for w in v[version]["workers"]) for v in replica_versions(stack).values()):
        assert time.monotonic() < deadline, replica_versions(stack)
        time.sleep(1)


def test_stage_loads_a_version_beside_the_live_one_on_every_replica_losing_no_request(stack, connection, configs):
    before = {r["index"]: r["pid"] for r in stack.replica_state()}
    with Load(stack, threads=4) as load:
        time.sleep(2)
        assert rollout.main(["--version", "2.0", "--stage", "--model-config", str(configs["same"]), *connection]) == 0
        time.sleep(2)
    assert load.failures() == [], load.failures()[:5]
    assert len(load.answers) > 50 and {a.version for a in load.answers} == {"1.0"}  # nothing switched
    versions = replica_versions(stack)
    assert all(set(v) == {"1.0", "2.0"} for v in versions.values()), versions
    assert all(any(w["status"] == "READY" for w in v["2.0"]["workers"]) for v in versions.values())
    after = {r["index"]: r["pid"] for r in stack.replica_state()}
    assert set(after) == set(before) and all(after[i] != before[i] for i in before)  # each replica replaced
    assert json.loads((stack.run_dir / "rollout.json").read_text())["live"] == "1.0"
    # the model API stays off: nothing can be registered through the gateway
    assert requests.post(f"{stack.management}/models", params={"url": "fashion_cnn_v2.0.mar"},
                         headers=auth(stack, "management"), timeout=30).status_code in (403, 405)


def test_shadow_answers_clients_as_without_it_and_records_both_versions(stack, connection, images, capsys):
    off = send(stack, images, "off")
    assert ctl.main(["shadow", MODEL, "2.0", *connection]) == 0
    on = send(stack, images, "on")
    assert [body for body, _, _ in on] == [body for body, _, _ in off]  # byte-identical: ids and timing are headers
    assert {v for _, v, _ in on} == {"1.0"}
    deadline = time.monotonic() + 60
    while shadow_outcomes(stack, "2.0").get("answered", 0) < len(images):
        assert time.monotonic() < deadline, shadow_outcomes(stack, "2.0")
        time.sleep(0.5)
    rep = compare(connection, "2.0", capsys)
    assert rep["requests"] == len(images) and rep["answers"] == len(images)  # the shadowed requests, each once
    assert rep["agreement"] == 1.0
    assert rep["versions"]["1.0"]["uncertain"] == rep["versions"]["2.0"]["uncertain"]
    assert rep["verdict"] in ("PROMOTE", "REVIEW") and rep["reasons"]
    gauges = {(name, s.get("Side")): v for name, s, v in metrics(stack) if name.startswith("rollout_")
              and s.get("Candidate") == "2.0"}
    assert gauges[("rollout_compared_answers", None)] == gauges[("rollout_agreeing_answers", None)] == len(images)
    shares = {s["ModelVersion"]: v for name, s, v in metrics(stack) if name == "gateway_rollout_shadow"}
    assert shares == {"1.0": 0, "2.0": 1}


def test_a_frozen_or_killed_shadow_costs_clients_nothing(stack, connection, images):
    baseline = send(stack, images[:50], "base")
    before = shadow_outcomes(stack, "2.0")
    pids = worker_pids(stack, "2.0")
    for pid in pids:  # the candidate's workers freeze: each mirrored copy would wait for the sink's 10 s timeout
        os.kill(pid, signal.SIGSTOP)
    try:
        frozen = send(stack, images[:50], "frozen")
        deadline = time.monotonic() + 30
        while shadow_outcomes(stack, "2.0").get("failed", 0) <= before.get("failed", 0):
            assert time.monotonic() < deadline, shadow_outcomes(stack, "2.0")
            time.sleep(0.5)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert [b for b, _, _ in frozen] == [b for b, _, _ in baseline]
    assert max(t for _, _, t in frozen) < 2.0, max(t for _, _, t in frozen)  # nobody waited for the shadow
    print(f"candidate frozen: 50 requests, median {statistics.median(t for _, _, t in frozen) * 1000:.1f} ms, max "
          f"{max(t for _, _, t in frozen) * 1000:.1f} ms (shadow on, candidate answering: median "
          f"{statistics.median(t for _, _, t in baseline) * 1000:.1f} ms, max {max(t for _, _, t in baseline) * 1000:.1f} ms)")

    for pid in worker_pids(stack, "2.0"):  # killed: TorchServe restarts them; clients do not notice
        os.kill(pid, signal.SIGKILL)
    killed = send(stack, images[:50], "killed")
    assert [b for b, _, _ in killed] == [b for b, _, _ in baseline]

    sink = stack.state()["shadow_pid"]
    os.kill(sink, signal.SIGKILL)  # the sink itself: the hops' mirror fails at once; the supervisor restarts it
    gone = send(stack, images[:50], "nosink")
    assert [b for b, _, _ in gone] == [b for b, _, _ in baseline]
    deadline = time.monotonic() + 30
    while stack.state().get("shadow_pid") in (sink, None):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    wait_ready(stack, "2.0")


def test_compare_gives_the_offline_agreement_of_a_different_candidate(stack, connection, configs, images, tmp_path_factory,
                                                                      capsys, holdout):
    assert rollout.main(["--version", "3.0", "--stage", "--model-config", str(configs["fp32"]), *connection]) == 0
    assert ctl.main(["shadow", MODEL, "3.0", *connection]) == 0
    sent = send(stack, images, "fp32")
    assert {v for _, v, _ in sent} == {"1.0"}
    deadline = time.monotonic() + 90
    while shadow_outcomes(stack, "3.0").get("answered", 0) < len(images):
        assert time.monotonic() < deadline, shadow_outcomes(stack, "3.0")
        time.sleep(0.5)
    rep = compare(connection, "3.0", capsys)

    # the same images through the handler in this process, as each archive configures it (int8 live, fp32 candidate)
    served = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())["handler"]
    labels = {}
    for precision in ("int8", "fp32"):
        handler, ctx = shipped_handler(tmp_path_factory.mktemp(precision), **{**served, "threads": 1, "precision": precision})
        labels[precision] = []
        for data in images:
            statuses, answers = run_batch(handler, ctx, [({"body": data}, {})])
            assert statuses == [200]
            labels[precision].append(answers[0]["label"])
    agreeing = sum(a == b for a, b in zip(labels["int8"], labels["fp32"]))
    assert labels["int8"] == [json.loads(b)["label"] for b, _, _ in sent]  # the live answers are the int8 model's
    assert rep["requests"] == len(images)
    assert rep["agreeing"] == agreeing, (rep["agreeing"], agreeing, rep["disagreements"])
    assert rep["agreement"] == pytest.approx(agreeing / len(images), abs=1e-6)
    print(f"int8 vs fp32 on {len(images)} held-out images: {agreeing} agree offline ({agreeing / len(images):.4f}), "
          f"{rep['agreeing']} live")


def test_canary_sends_the_configured_share_to_the_candidate(stack, connection):
    assert ctl.main(["canary", MODEL, "2.0", "--percent", "10", *connection]) == 0
    body = (REPO / "examples" / "coat.png").read_bytes()
    versions: list[str | None] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        session = requests.Session()
        for _ in range(n):
            resp = session.post(f"{stack.inference}/predictions/{MODEL}", data=body, headers=auth(stack), timeout=60)
            with lock:
                versions.append(resp.headers.get("X-Model-Version") if resp.status_code == 200 else f"HTTP {resp.status_code}")

    threads = [threading.Thread(target=client, args=(250,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert len(versions) == 2000 and set(versions) == {"1.0", "2.0"}, set(versions)
    share = versions.count("2.0") / len(versions)
    print(f"canary at 10 %: {versions.count('2.0')} of 2000 answered by 2.0 ({share:.2%})")
    assert 0.08 <= share <= 0.12, share
    shares = {s["ModelVersion"]: v for name, s, v in metrics(stack) if name == "gateway_rollout_share"}
    assert shares == {"1.0": pytest.approx(0.9), "2.0": pytest.approx(0.1)}


def test_promote_and_rollback_under_16_clients_lose_nothing(stack, connection):
    with Load(stack, threads=16) as load:
        time.sleep(3)
        t0 = time.monotonic()
        assert ctl.main(["promote", MODEL, "2.0", *connection]) == 0
        t1 = time.monotonic()
        promoted = defaults(stack)
        time.sleep(4)
        t2 = time.monotonic()
        assert ctl.main(["rollback", MODEL, *connection]) == 0
        t3 = time.monotonic()
        time.sleep(4)
    assert load.failures() == [], load.failures()[:5]
    assert promoted == ["2.0", "2.0"]  # every replica
    assert defaults(stack) == ["1.0", "1.0"]
    windows = [load.between(0, t0), load.between(t1, t2), load.between(t3, float("inf"))]
    assert {a.version for a in windows[0]} == {"1.0", "2.0"}  # the canary's split
    assert [{a.version for a in w} for w in windows[1:]] == [{"2.0"}, {"1.0"}]
    assert all(len(w) >= 10 for w in windows), [len(w) for w in windows]
    print(f"promote and rollback under 16 clients: {len(load.answers)} requests, 0 failed")


def test_a_replica_restarted_after_a_promote_serves_the_promoted_version(stack, connection):
    assert ctl.main(["promote", MODEL, "2.0", *connection]) == 0
    victim = stack.replica_state()[1]
    os.kill(victim["pid"], signal.SIGKILL)  # its TorchServe frontend; the supervisor restarts it with --ncs
    deadline = time.monotonic() + 240
    while True:
        ready = requests.get(f"{stack.inference}/ping", timeout=10).json()
        state = next(r for r in stack.replica_state() if r["index"] == 1)
        if state["pid"] not in (None, victim["pid"]) and all(r["ready"] for r in ready["replicas"]):
            break
        assert time.monotonic() < deadline, ready
        time.sleep(1)
    assert defaults(stack) == ["2.0", "2.0"]  # the promoted archive is listed first for every restart
    answers = send(stack, [(REPO / "examples" / "coat.png").read_bytes()] * 20, "after-restart")
    assert {v for _, v, _ in answers} == {"2.0"}
    assert ctl.main(["rollback", MODEL, *connection]) == 0
    assert defaults(stack) == ["1.0", "1.0"]
