"""Faults under load through the gateway with two replicas: no request is lost.

16 concurrent clients post real images for a bounded time while a worker is killed, a
whole replica is killed, a replica's workers are frozen, or a replica's hop (its nginx) is
killed. Every request must get its 200; the supervisor must bring the dead back, count the
restart, and put it back into rotation without reloading the gateway; a frozen replica must
stop being "ready" while the other serves. Last, the gateway's own master is killed (an
outage for its clients): it is restarted and its orphaned worker ended.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from datetime import datetime

import psutil
import pytest
import requests

from scripts.deploy.harness import REPO
from scripts.ops.capacity import workers_of
from tests.integration.stack import running_stack

COAT = REPO / "examples" / "coat.png"
CLIENTS = 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("faults"), replicas=2) as s:
        yield s


class Load:
    """CLIENTS threads posting coat.png until stopped; every status (or exception) counted."""

    def __init__(self, stack):
        self.url = f"{stack.inference}/predictions/fashion_cnn"
        self.headers = {"Authorization": f"Bearer {stack.key()}"}
        self.stop = threading.Event()
        self.results: Counter = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self):
        session, body = requests.Session(), COAT.read_bytes()
        while not self.stop.is_set():
            try:
                resp = session.post(self.url, data=body, headers=self.headers, timeout=90)
                outcome = resp.status_code if resp.status_code != 200 or resp.json()["label"] == "Coat" else "wrong label"
                if resp.status_code != 200:
                    outcome = f"{resp.status_code} {resp.text[:120]}"  # what TorchServe or the gateway said
            except Exception as exc:  # a lost request
                outcome = type(exc).__name__
            with self.lock:
                self.results[outcome] += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(3)  # in full swing before the fault
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def frontend(stack, index: int) -> psutil.Process:
    return psutil.Process(next(r["pid"] for r in stack.replica_state() if r["index"] == index))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def ended(procs: list[psutil.Process]) -> bool:
    """Every one gone (a zombie counts: it was ended and awaits its new parent's wait)."""
    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(gone(p) for p in procs)


def ready_replicas(stack) -> set[int]:
    try:
        return {r["index"] for r in stack.ping().json()["replicas"] if r["ready"]}
    except (requests.RequestException, ValueError, KeyError):
        return set()


def test_killing_a_worker_under_load_loses_no_request(stack):
    victim = workers_of(frontend(stack, 0).pid)[0]
    with Load(stack) as load:
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(8)
    assert set(load.results) == {200}, load.results
    assert sum(load.results.values()) > 50
    wait_for(lambda: len(workers_of(frontend(stack, 0).pid)) == 2, 60, "TorchServe to replace the worker")
    print(f"worker kill: {dict(load.results)}; retried: {sum(e['retries'] > 0 for e in stack.access_log())}")


def gateway_workers(stack) -> set[int]:
    """The gateway's nginx worker pids: a reload replaces them (and closes the clients' idle keep-alive connections)."""
    return {p.pid for p in psutil.Process(stack.state()["gateway_pid"]).children()}


def test_killing_a_whole_replica_under_load_loses_no_request_and_it_comes_back(stack):
    victim = frontend(stack, 1)
    workers_before = gateway_workers(stack)
    with Load(stack) as load:
        victim.kill()
        time.sleep(5)
        wait_for(lambda: ready_replicas(stack) == {0, 1}, 120, "the supervisor to bring replica 1 back")
        back = time.time()
        time.sleep(5)  # serving on both again
    assert set(load.results) == {200}, load.results
    assert frontend(stack, 1).pid != victim.pid
    assert gateway_workers(stack) == workers_before, "the gateway was reloaded: only replica 1's hop should be"
    metrics = requests.get(f"{stack.metrics}/metrics", timeout=30).text
    assert 'gateway_replica_restarts_total{replica="1"} 1' in metrics
    served_after = [e for e in stack.access_log() if "replica-1.sock" in e["upstream"].split(",")[-1]
                    and e["status"] == 200 and datetime.fromisoformat(e["time"]).timestamp() >= back - 1]
    assert served_after, "replica 1 came back but got no traffic"
    log = (stack.log_dir / "supervisor.log").read_text()
    assert "replica 1: TorchServe frontend is gone: restarting it (restart 1)" in log and "replica 1 is back" in log


def test_a_frozen_replica_is_not_ready_and_leaves_rotation_while_the_other_serves(stack):
    workers = workers_of(frontend(stack, 1).pid)
    assert workers
    try:
        for w in workers:
            w.suspend()
        wait_for(lambda: ready_replicas(stack) == {0}, 40, "replica 1 to turn not ready while frozen")
        assert stack.ping().status_code == 200  # one replica can still serve
        status = stack.serve("status", timeout=60)
        assert "replica 1: NOT READY" in status.stdout and status.returncode == 0, status.stdout
        with Load(stack) as load:
            time.sleep(5)
        assert set(load.results) == {200}, load.results
    finally:
        for w in workers:
            w.resume()
    wait_for(lambda: ready_replicas(stack) == {0, 1}, 60, "replica 1 to be ready again after it thaws")


def test_killing_a_replicas_hop_under_load_loses_no_request_and_it_comes_back(stack):
    """Replica 0's hop (its own nginx) loses its master; the supervisor ends the orphaned worker and restarts the hop."""
    hop = psutil.Process(stack.state()["hop_pids"][0])
    orphans = hop.children()
    assert orphans
    workers_before = gateway_workers(stack)

    def hop_back() -> bool:
        pid = stack.state()["hop_pids"][0]
        return pid is not None and pid != hop.pid and psutil.pid_exists(pid)

    with Load(stack) as load:
        hop.kill()  # its worker lives on, orphaned, still listening on the hop's sockets
        wait_for(hop_back, 30, "the supervisor to restart replica 0's hop")
        back = time.time()
        time.sleep(4)  # serving through the new hop
    assert set(load.results) == {200}, load.results
    assert gateway_workers(stack) == workers_before
    wait_for(lambda: ended(orphans), 10, "the dead master's worker to be ended")
    log = (stack.log_dir / "supervisor.log").read_text()
    assert "replica 0's hop (nginx) is gone: restarting it" in log
    metrics = requests.get(f"{stack.metrics}/metrics", timeout=30).text
    assert "gateway_restarts_total 1" in metrics
    served_after = [e for e in stack.access_log() if "replica-0.sock" in e["upstream"].split(",")[-1]
                    and e["status"] == 200 and datetime.fromisoformat(e["time"]).timestamp() >= back - 1]
    assert served_after, "replica 0's hop came back but got no traffic"


def test_a_killed_gateway_master_is_restarted_and_its_orphaned_worker_ended(stack):
    """The public gateway's master dies outright: its worker would go on accepting on the public ports (reuseport)."""
    master = psutil.Process(stack.state()["gateway_pid"])
    orphans = master.children()
    assert orphans
    master.kill()

    def restarted() -> bool:
        pid = stack.state()["gateway_pid"]
        return pid is not None and pid != master.pid and psutil.pid_exists(pid)

    wait_for(restarted, 30, "the supervisor to restart the gateway")
    wait_for(lambda: ended(orphans), 10, "the dead master's worker to be ended")
    resp = requests.post(f"{stack.inference}/predictions/fashion_cnn", data=COAT.read_bytes(),
                         headers={"Authorization": f"Bearer {stack.key()}"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["label"] == "Coat", resp.text
    assert "the gateway (nginx) is gone: restarting it" in (stack.log_dir / "supervisor.log").read_text()


def test_no_acknowledged_label_is_lost_across_kill_9_of_the_recorder_a_replica_and_the_gateway_under_load(stack):
    """8 clients predict, 4 labellers label every answer (retrying until acknowledged) while the recorder, replica 1's
    frontend and the gateway's master are killed in turn. Every acknowledged label is in the store afterwards with
    the label sent, and every answer a client received could be labelled (it was recorded): no 404."""
    import json
    import queue

    stop, answered, lock = threading.Event(), queue.Queue(), threading.Lock()
    acked: dict[str, str] = {}
    outcomes: Counter = Counter()
    key, fb = {"Authorization": f"Bearer {stack.key()}"}, {"Authorization": f"Bearer {stack.key('feedback')}"}

    def predictor(n: int) -> None:
        session, body, i = requests.Session(), COAT.read_bytes(), 0
        while not stop.is_set():
            rid = f"kill9-{n}-{i}"
            i += 1
            try:
                resp = session.post(f"{stack.inference}/predictions/fashion_cnn", data=body, timeout=90,
                                    headers={**key, "X-Request-ID": rid})
                outcome = resp.status_code
                if resp.status_code == 200:
                    answered.put((rid, resp.json()["label"]))
            except requests.RequestException as exc:  # the gateway's outage: its clients' connections fail
                outcome = type(exc).__name__
            with lock:
                outcomes[f"predict {outcome}"] += 1

    def labeller() -> None:
        session = requests.Session()
        while not (stop.is_set() and answered.empty()):
            batch = []
            while len(batch) < 8:
                try:
                    batch.append(answered.get(timeout=0.2))
                except queue.Empty:
                    break
            if not batch:
                continue
            doc = [{"request_id": rid, "label": label} for rid, label in batch]
            for _ in range(600):  # until acknowledged (a 4xx is a failure of the test, not retried)
                try:
                    resp = session.post(f"{stack.inference}/feedback/fashion_cnn", data=json.dumps(doc), timeout=30,
                                        headers={**fb, "Content-Type": "application/json"})
                except requests.RequestException as exc:
                    with lock:
                        outcomes[f"label {type(exc).__name__}"] += 1
                    time.sleep(0.2)
                    continue
                with lock:
                    outcomes[f"label {resp.status_code}"] += 1
                if resp.status_code == 200:
                    with lock:
                        acked.update({r["request_id"]: r["label"] for r in resp.json()["labels"]})
                    break
                if resp.status_code < 500:
                    with lock:
                        outcomes[f"refused {resp.json().get('type')}"] += 1
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=predictor, args=(n,), daemon=True) for n in range(8)]
    threads += [threading.Thread(target=labeller, daemon=True) for _ in range(4)]
    recorder = psutil.Process(stack.state()["recorder_pid"])
    replica = frontend(stack, 1)
    gateway = psutil.Process(stack.state()["gateway_pid"])
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        recorder.kill()
        wait_for(lambda: stack.state().get("recorder_pid") not in (None, recorder.pid), 30, "the recorder restarted")
        time.sleep(3)
        replica.kill()

        def replica_back() -> bool:
            try:
                return frontend(stack, 1).pid != replica.pid and ready_replicas(stack) == {0, 1}
            except (psutil.Error, StopIteration, TypeError, ValueError):
                return False

        wait_for(replica_back, 120, "the supervisor to bring replica 1 back")
        time.sleep(2)
        gateway.kill()
        wait_for(lambda: stack.state().get("gateway_pid") not in (None, gateway.pid), 30, "the gateway restarted")
        time.sleep(4)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    stored, after = {}, 0
    while True:
        page = requests.get(f"{stack.management}/feedback/fashion_cnn/export", params={"after": after, "limit": 2000},
                            headers={"Authorization": f"Bearer {stack.key('management')}"}, timeout=60).json()
        stored.update({it["request_id"]: it["label"] for it in page["items"]})
        if page["next"] is None:
            break
        after = page["next"]
    lost = {rid: label for rid, label in acked.items() if stored.get(rid) != label}
    refused = {k: v for k, v in outcomes.items() if k.startswith("refused")}
    print(f"\nkill -9 recorder, replica 1, gateway: {dict(outcomes)}; {len(acked)} labels acknowledged")
    assert len(acked) > 200 and not lost, f"{len(lost)} acknowledged labels lost: {list(lost.items())[:5]}"
    assert not refused, refused  # every answer a client got was recorded and could be labelled
    assert outcomes["predict 200"] >= len(acked) and answered.empty()
    assert any(k.startswith("label ") and k != "label 200" for k in outcomes), "no fault was met by the labellers"
    log = (stack.log_dir / "supervisor.log").read_text()
    assert "the recorder is gone: restarting it" in log
    metrics = requests.get(f"{stack.metrics}/metrics", timeout=30).text
    assert "gateway_recorder_restarts_total 1" in metrics
    lost_records = [line for line in metrics.splitlines() if line.startswith("RecordLost{") and not line.endswith(" 0.0")
                    and not line.endswith(" 0")]
    assert not lost_records, lost_records
