"""The recorder process (scripts/deploy/recorder.py) on its own, as the supervisor runs it, with the handler's own
spool writer feeding it: every spooled answer in the store exactly once and no acknowledged label lost across
``kill -9`` of the recorder (SQLite, the default store); and, on a real PostgreSQL, the store going down and coming
back: labels refused with 503 meanwhile, the backlog ingested after.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import zlib

import pytest
import requests

from handler import record
from tests.feedback_helpers import (
    CLASSES,
    RecorderProcess,
    _account,
    answer_line,
    model_line,
    pg_bin,
    postgres,
    postgres_missing,
)

MODEL = "fashion_cnn"


def truth(request_id: str) -> str:
    return CLASSES[zlib.crc32(request_id.encode()) % 10]


class Writer(threading.Thread):
    """The worker side: batches of answer lines through handler/record.py's Spool, small segments so they rotate."""

    def __init__(self, folder):
        super().__init__(daemon=True)
        self.spool = record.Spool(folder, 2**30, (json.dumps(model_line()) + "\n").encode(), segment_bytes=64 * 1024)
        self.written: list[str] = []
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            ids = [f"w{n + i}" for i in range(8)]
            lines = [answer_line(rid, CLASSES[(n + i) % 10], seed=i) for i, rid in enumerate(ids)]
            self.spool.append(("\n".join(json.dumps(x) for x in lines) + "\n").encode())
            self.written += ids  # spooled: from now on the answer exists for the client
            n += 8
            time.sleep(0.02)  # ~400 answers a second: more than these 2 cores serve


def label_until_stopped(recorder: RecorderProcess, writer: Writer, acked: dict, outcomes: list, stop: threading.Event):
    rng = random.Random(threading.get_ident())
    while not stop.is_set():
        if not writer.written:
            time.sleep(0.01)
            continue
        batch = list({rng.choice(writer.written) for _ in range(5)})
        try:
            resp = recorder.post(f"/feedback/{MODEL}", [{"request_id": rid, "label": truth(rid)} for rid in batch],
                                 timeout=10)
            outcomes.append(resp.status_code)
            if resp.status_code == 200:
                for item in resp.json()["labels"]:
                    acked[item["request_id"]] = item["label"]
        except requests.ConnectionError:  # the recorder was killed mid-request: not acknowledged, tried again
            outcomes.append("connection")
            time.sleep(0.05)


def exported(recorder: RecorderProcess) -> dict[str, str]:
    out, after = {}, 0
    while True:
        page = recorder.get(f"/feedback/{MODEL}/export?after={after}&limit=2000",
                            headers={"X-Feedback-Api": "management"}).json()
        out.update({it["request_id"]: it["label"] for it in page["items"]})
        if page["next"] is None:
            return out
        after = page["next"]


def test_kill_9_of_the_recorder_under_load_loses_no_acknowledged_label_and_no_answer(tmp_path):
    store = str(tmp_path / "feedback.sqlite3")
    recorder = RecorderProcess(tmp_path, store).start()
    writer = Writer(recorder.spool / "replica-0")
    writer.start()
    acked, outcomes, stop = {}, [], threading.Event()
    labellers = [threading.Thread(target=label_until_stopped, args=(recorder, writer, acked, outcomes, stop), daemon=True)
                 for _ in range(3)]
    kills = 0
    try:
        for t in labellers:
            t.start()
        for _ in range(3):
            time.sleep(1.5)
            recorder.kill()  # kill -9 mid-ingestion and mid-label
            kills += 1
            time.sleep(0.3)
            recorder.start()
        time.sleep(1.5)
    finally:
        stop.set()
        writer.stop.set()
        for t in labellers:
            t.join(30)
        writer.join(30)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            summary = recorder.get(f"/feedback/{MODEL}/summary").json()
            if summary["versions"]["1.0"]["recorded"] >= len(writer.written):
                break
            time.sleep(0.2)
        version = summary["versions"]["1.0"]
        stored = exported(recorder)
        metrics = recorder.get("/metrics").text
    finally:
        recorder.stop()
    assert kills == 3 and outcomes.count(200) >= 10 and "connection" in outcomes, outcomes[-20:]
    assert version["recorded"] == len(writer.written)  # every spooled answer exactly once, across three kills
    lost = {rid: label for rid, label in acked.items() if stored.get(rid) != label}
    assert not lost, f"{len(lost)} acknowledged labels missing or changed: {list(lost.items())[:5]}"
    assert version["labelled"] == len(stored) >= len(acked) and version["correct"] == sum(
        1 for rid, label in stored.items() if label == CLASSES[int(rid[1:]) % 10])
    labelled = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("feedback_labelled_total{"))
    assert labelled == version["labelled"]
    finished = [p for p in recorder.spool.rglob("*.jsonl")]
    assert len(finished) <= 1, finished  # fully read segments of a writer that moved on are deleted
    print(f"\n{len(writer.written)} answers spooled, {len(acked)} labels acknowledged, {kills} kill -9, "
          f"{outcomes.count('connection')} connections cut, {outcomes.count(200)} label requests answered 200")


@pytest.mark.skipif(postgres_missing() is not None, reason=postgres_missing() or "")
def test_the_store_going_down_refuses_labels_with_503_and_the_backlog_is_ingested_when_it_is_back(tmp_path):
    with postgres() as dsn:
        recorder = RecorderProcess(tmp_path, dsn).start()
        try:
            spool = record.Spool(recorder.spool / "replica-0", 2**30, (json.dumps(model_line()) + "\n").encode())
            spool.append((json.dumps(answer_line("before", "Coat")) + "\n").encode())
            assert recorder.post(f"/feedback/{MODEL}", {"request_id": "before", "label": "Coat"}).status_code == 200
            host = dsn.split("host=", 1)[1]  # the cluster's own folder: its socket, data/ and server.log
            account = _account()
            kwargs = {"user": account[0], "group": account[1], "extra_groups": []} if account else {}
            pgdata = f"{host}/data"
            subprocess.run([pg_bin("pg_ctl"), "-D", pgdata, "-m", "fast", "-w", "stop"], check=True,
                           capture_output=True, **kwargs)
            spool.append(("\n".join(json.dumps(answer_line(f"during{i}", "Bag")) for i in range(5)) + "\n").encode())
            down = recorder.post(f"/feedback/{MODEL}", {"request_id": "before", "label": "Coat"})
            assert down.status_code == 503 and down.json()["type"] == "StoreUnavailable", down.text
            assert "retry" in down.json()["message"] and down.headers.get("Retry-After")
            assert "recorder_store_up 0" in recorder.get("/metrics").text
            subprocess.run([pg_bin("pg_ctl"), "-D", pgdata, "-l", f"{host}/server.log", "-o",
                            f"-k {host} -c listen_addresses=''", "-w", "start"], check=True, capture_output=True, **kwargs)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                resp = recorder.post(f"/feedback/{MODEL}", [{"request_id": f"during{i}", "label": "Bag"} for i in range(5)])
                if resp.status_code == 200:
                    break
                time.sleep(0.3)
            assert resp.status_code == 200, resp.text
            version = recorder.get(f"/feedback/{MODEL}/summary").json()["versions"]["1.0"]
            assert (version["recorded"], version["labelled"], version["correct"]) == (6, 6, 6)
            assert "recorder_store_up 1" in recorder.get("/metrics").text
        finally:
            recorder.stop()
