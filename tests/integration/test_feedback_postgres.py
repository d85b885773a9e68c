"""The feedback store on a real PostgreSQL (Debian's package, started here in a temporary folder as an unprivileged
user, on a Unix socket): every store test of tests/unit/test_feedback_store.py again, on PostgreSQL; then two
recorders (two hosts, each with its own spool) on one database, as several replicas or hosts run it.

Skipped, with the reason, where PostgreSQL is not installed (scripts/setup_env.sh installs it).
"""

from __future__ import annotations

import json

import pytest

from tests.feedback_helpers import RecorderProcess, answer_line, model_line, postgres, postgres_missing, write_spool
from tests.unit import test_feedback_store as contract

pytestmark = pytest.mark.skipif(postgres_missing() is not None, reason=postgres_missing() or "")


@pytest.fixture(scope="module")
def cluster():
    """One PostgreSQL cluster and database for the module; each test starts from an empty schema."""
    with postgres("feedback") as dsn:
        yield dsn


@pytest.fixture
def store_url(cluster):
    import psycopg

    with psycopg.connect(cluster, autocommit=True) as conn:  # a database per test costs a checkpoint of its files
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return cluster


# The store's contract, on PostgreSQL (the fixtures above replace the unit module's SQLite ones).
for _name in dir(contract):
    if _name.startswith("test_") and _name != "test_wilson_interval":
        globals()[_name] = getattr(contract, _name)
store = contract.store


def test_two_hosts_recorders_share_one_database(store_url, tmp_path):
    """Each host's recorder ingests its own spool into the same PostgreSQL; a label sent through either host counts once,
    and both export the same counters (Prometheus takes the max across them, not the sum)."""
    hosts = []
    for name in ("host-a", "host-b"):
        root = tmp_path / name
        root.mkdir()
        hosts.append(RecorderProcess(root, store_url).start())
    try:
        write_spool(hosts[0].spool / "replica-0", [answer_line(f"a{i}", "Coat") for i in range(10)])
        write_spool(hosts[1].spool / "replica-0", [answer_line(f"b{i}", "Bag") for i in range(10)],
                    header=model_line())
        # labels for both hosts' answers through host a only, then through host b; the same ones twice
        first = hosts[0].post("/feedback/fashion_cnn", [{"request_id": f"{h}{i}", "label": "Coat"}
                                                       for h in "ab" for i in range(10)])
        assert first.status_code == 200, first.text
        again = hosts[1].post("/feedback/fashion_cnn", [{"request_id": "b3", "label": "coat"}])
        assert again.status_code == 200 and again.json()["labels"][0]["status"] == "unchanged"
        conflict = hosts[1].post("/feedback/fashion_cnn", {"request_id": "a1", "label": "Bag"})
        assert conflict.status_code == 409 and conflict.json()["type"] == "LabelConflict"
        summaries = [h.get("/feedback/fashion_cnn/summary").json() for h in hosts]
        assert summaries[0] == summaries[1]
        version = summaries[0]["versions"]["1.0"]
        assert (version["labelled"], version["correct"], version["recorded"]) == (20, 10, 20)
        assert summaries[0]["disputes"] == 1
        texts = [h.get("/metrics").text for h in hosts]
        counters = [sorted(line for line in t.splitlines() if line.startswith("feedback_")) for t in texts]
        assert counters[0] == counters[1]
        assert 'feedback_correct_total{ModelName="fashion_cnn",ModelVersion="1.0",Flag="confident",Label="Coat"} 10' \
            in counters[0]
    finally:
        for h in hosts:
            h.stop()
    assert json.loads(json.dumps(summaries[0]))  # plain JSON all the way
