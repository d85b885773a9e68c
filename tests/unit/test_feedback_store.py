"""The feedback store (scripts/deploy/store.py) on a real SQLite file: ingestion, labels, the tally, review, retention.

The same tests run against a real PostgreSQL in tests/integration/test_feedback_postgres.py (which overrides
``store_url``): both stores must behave alike.
"""

from __future__ import annotations

import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from scripts.deploy import store as st
from tests.feedback_helpers import CLASSES, answer_line, model_line


@pytest.fixture
def store_url(tmp_path):
    return str(tmp_path / "feedback.sqlite3")


@pytest.fixture
def store(store_url):
    s = st.Store(store_url)
    yield s
    s.close()


def ingest(store, lines, segment="seg", offset=None):
    return store.ingest(segment, offset if offset is not None else store.offset(segment) + 1, [model_line(), *lines])


def test_the_migrations_create_exactly_the_schema_and_run_once(store, store_url):
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), st.METADATA) == []
    ingest(store, [answer_line("a")])
    again = st.Store(store_url)  # a second start: at head already, nothing to do, nothing lost
    assert again.model_classes("fashion_cnn") == tuple(CLASSES) and again.known("fashion_cnn", "a", 0)
    again.close()


def test_ingestion_adds_each_answer_once_and_commits_its_offset(store):
    lines = [answer_line(f"r{i}", CLASSES[i % 10]) for i in range(30)]
    assert store.ingest("seg", 1234, [model_line(), *lines]) == 30
    assert store.offset("seg") == 1234
    assert store.ingest("seg", 1234, [model_line(), *lines]) == 0  # a recorder killed before its offset was read back
    assert store.summary("fashion_cnn")["versions"]["1.0"]["recorded"] == 30
    store.forget_segment("seg")
    assert store.offset("seg") == 0


def test_labels_by_name_index_and_not_a_garment_and_the_summary_is_exact(store):
    truth = {}
    lines = []
    for i in range(40):
        predicted = CLASSES[i % 10]
        lines.append(answer_line(f"r{i}", predicted, uncertain=i % 5 == 0, ood=i % 13 == 0))
        truth[f"r{i}"] = predicted if i % 10 else CLASSES[(i + 1) % 10]  # every 10th answer is wrong: 36/40
    ingest(store, lines)
    items = [{"request_id": rid, "label": label if i % 3 else CLASSES.index(label) if i % 2 else label.upper()}
             for i, (rid, label) in enumerate(truth.items())]
    results = store.label("fashion_cnn", st.parse_body(items))
    assert [r["status"] for r in results] == ["recorded"] * 40
    assert results[1]["versions"]["1.0"] == {"predicted": CLASSES[1], "correct": True}
    version = store.summary("fashion_cnn")["versions"]["1.0"]
    assert {k: version[k] for k in ("labelled", "correct", "accuracy", "interval")} == \
        {"labelled": 40, "correct": 36, "accuracy": 0.9, "interval": [0.7695, 0.9604]}  # the issue's example: [0.77, 0.96]
    flags = version["by_flag"]
    assert sum(f["labelled"] for f in flags.values()) == 40
    assert flags["out_of_distribution"]["labelled"] == sum(1 for i in range(40) if i % 13 == 0)
    assert flags["uncertain"]["labelled"] == sum(1 for i in range(40) if i % 5 == 0 and i % 13)
    ingest(store, [answer_line("junk", "Bag", seed=9)])
    assert store.label("fashion_cnn", st.parse_body({"request_id": "junk", "label": " Not a  GARMENT "}))[0]["label"] == \
        st.NOT_A_GARMENT
    summary = store.summary("fashion_cnn")["versions"]["1.0"]
    assert summary["by_label"][st.NOT_A_GARMENT] == {"labelled": 1, "correct": 0, "accuracy": 0.0, "interval": [0.0, 0.7935]}


def test_the_same_label_again_changes_nothing_and_another_is_refused_and_kept_as_a_dispute(store):
    ingest(store, [answer_line("a", "Coat"), answer_line("b", "Bag")])
    first = store.label("fashion_cnn", st.parse_body({"request_id": "a", "label": "Shirt"}))
    assert first[0]["status"] == "recorded" and first[0]["versions"]["1.0"]["correct"] is False
    again = store.label("fashion_cnn", st.parse_body([{"request_id": "a", "label": 6}, {"request_id": "b", "label": "Bag"}]))
    assert [r["status"] for r in again] == ["unchanged", "recorded"]
    before = store.summary("fashion_cnn")
    with pytest.raises(st.LabelConflict) as conflict:
        store.label("fashion_cnn", st.parse_body([{"request_id": "a", "label": "Coat"}]))
    assert conflict.value.status == 409 and "first label given stands" in conflict.value.message
    assert conflict.value.details["conflicts"] == [{"request_id": "a", "index": 0, "label": "Coat", "standing": "Shirt"}]
    after = store.summary("fashion_cnn")
    assert after["disputes"] == 1 and after["versions"] == before["versions"]  # nothing recorded
    # a list with one conflict records none of it
    ingest(store, [answer_line("c", "Dress")])
    with pytest.raises(st.LabelConflict):
        store.label("fashion_cnn", st.parse_body([{"request_id": "c", "label": "Dress"}, {"request_id": "a", "label": 4}]))
    assert store.summary("fashion_cnn")["versions"]["1.0"]["labelled"] == 2


@pytest.mark.parametrize("body, error, fragment", [
    ({"request_id": "a", "label": "Jumper"}, st.UnknownLabel, 'class name ("T-shirt/top"'),
    ({"request_id": "a", "label": 10}, st.UnknownLabel, "class index from 0 to 9"),
    ({"request_id": "a", "label": True}, st.UnknownLabel, "not a garment"),
    ({"request_id": "nope", "label": "Coat"}, st.UnknownRequest, "X-Request-ID header of the answer"),
    ({"request_id": "a", "index": 1, "label": "Coat"}, st.UnknownRequest, "a (index 1)"),
    ({"request_id": "a"}, st.MalformedFeedback, '"label" is missing'),
    ({"label": "Coat"}, st.MalformedFeedback, '"request_id" must be'),
    ({"request_id": "a", "index": -1, "label": "Coat"}, st.MalformedFeedback, '"index" must be'),
    ([], st.MalformedFeedback, "non-empty list"),
    ("Coat", st.MalformedFeedback, "JSON object"),
    ([{"request_id": "a", "label": "Coat"}] * 1001, st.TooManyLabels, "at most 1000"),
])
def test_bad_labels_get_a_4xx_that_says_what_to_send_and_record_nothing(store, body, error, fragment):
    ingest(store, [answer_line("a", "Coat")])
    with pytest.raises(error) as caught:
        store.label("fashion_cnn", st.parse_body(body))
    assert 400 <= caught.value.status < 500 and fragment in caught.value.message, caught.value.message
    assert store.summary("fashion_cnn")["versions"]["1.0"]["labelled"] == 0
    with pytest.raises(st.UnknownModel):
        store.label("other_model", st.parse_body({"request_id": "a", "label": 0}))


def test_two_versions_answering_one_request_are_kept_side_by_side_and_one_label_counts_for_both(store):
    ingest(store, [answer_line("r1", "Coat", version="1.0"), answer_line("r2", "Bag", version="1.0")])
    store.ingest("seg2", 10, [model_line(version="2.0"), answer_line("r1", "Shirt", version="2.0")])
    result = store.label("fashion_cnn", st.parse_body([{"request_id": "r1", "label": "Shirt"},
                                                       {"request_id": "r2", "label": "Bag"}]))
    assert result[0]["versions"] == {"1.0": {"predicted": "Coat", "correct": False},
                                     "2.0": {"predicted": "Shirt", "correct": True}}
    # the candidate's answer to r2 arrives after r2's label (a shadow answer ingested late): counted when it comes
    store.ingest("seg2", 20, [model_line(version="2.0"), answer_line("r2", "Bag", version="2.0")])
    store.ingest("seg2", 20, [model_line(version="2.0"), answer_line("r2", "Bag", version="2.0")])  # and only once
    versions = store.summary("fashion_cnn")["versions"]
    assert (versions["1.0"]["labelled"], versions["1.0"]["correct"]) == (2, 1)
    assert (versions["2.0"]["labelled"], versions["2.0"]["correct"]) == (2, 2)


def test_the_prometheus_counters_are_the_tally_with_zeros_for_every_version_flag_and_label(store):
    ingest(store, [answer_line("a", "Coat"), answer_line("b", "Bag", uncertain=True)])
    store.label("fashion_cnn", st.parse_body([{"request_id": "a", "label": "Coat"}, {"request_id": "b", "label": "Coat"}]))
    lines = store.metrics_lines()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}
    base = 'ModelName="fashion_cnn",ModelVersion="1.0"'
    assert samples[f'feedback_labelled_total{{{base},Flag="confident",Label="Coat"}}'] == 1
    assert samples[f'feedback_correct_total{{{base},Flag="confident",Label="Coat"}}'] == 1
    assert samples[f'feedback_labelled_total{{{base},Flag="uncertain",Label="Coat"}}'] == 1
    assert samples[f'feedback_correct_total{{{base},Flag="uncertain",Label="Coat"}}'] == 0
    assert samples[f'feedback_labelled_total{{{base},Flag="out_of_distribution",Label="not a garment"}}'] == 0
    assert sum(1 for k in samples if k.startswith("feedback_labelled_total")) == 3 * 11
    assert samples['feedback_disputes_total{ModelName="fashion_cnn"}'] == 0


def test_the_review_queue_puts_hard_answers_first_and_every_fourth_place_to_a_random_confident_one(store):
    now = time.time()
    lines = [answer_line(f"ood{i}", "Bag", ood=True, uncertain=True, when=now - 100 + i) for i in range(3)]
    lines += [answer_line(f"unc{i}", "Shirt", uncertain=True, when=now - 50 + i) for i in range(6)]
    lines += [answer_line(f"easy{i}", "Coat", review=True, when=now - 10 + i) for i in range(4)]
    lines += [answer_line(f"unseen{i}", "Coat", review=False, when=now) for i in range(5)]  # not in the sample
    ingest(store, lines)
    order = [(it["request_id"], it["reason"]) for it in store.review("fashion_cnn", limit=12)]
    assert [rid for rid, _ in order[:3]] == ["ood2", "ood1", "ood0"]
    assert order[3] == ("easy3", "random sample") and order[7] == ("easy2", "random sample")
    assert [rid for rid, _ in order if rid.startswith("unc")] == [f"unc{i}" for i in range(5, -1, -1)]
    assert len(order) == 12 and not any(rid.startswith("unseen") for rid, _ in order)
    store.label("fashion_cnn", st.parse_body({"request_id": "ood2", "label": st.NOT_A_GARMENT}))
    assert store.review("fashion_cnn", limit=1)[0]["request_id"] == "ood1"  # labelled: off the queue
    assert store.review("fashion_cnn", limit=1, skip=[("ood1", 0)])[0]["request_id"] == "ood0"


def test_retention_deletes_old_and_oversized_unlabelled_answers_and_keeps_labelled_ones(store):
    now = time.time()
    ingest(store, [answer_line(f"old{i}", "Coat", when=now - 40 * 86400, seed=i) for i in range(5)]
           + [answer_line(f"new{i}", "Coat", when=now - i, seed=i) for i in range(20)])
    store.label("fashion_cnn", st.parse_body([{"request_id": "old0", "label": "Coat"}, {"request_id": "new19", "label": 4}]))
    assert store.prune(30 * 86400, None) == 4
    n, size = store.size()
    assert n == 21
    per = size / n
    assert store.prune(None, int(per * 10.5)) >= 10
    kept = {it["request_id"] for it in store.labelled("fashion_cnn")}
    assert kept == {"old0", "new19"}
    assert store.known("fashion_cnn", "new0", 0) and not store.known("fashion_cnn", "new18", 0)
    assert store.summary("fashion_cnn")["versions"]["1.0"]["labelled"] == 2  # the tally is never pruned


def test_two_recorders_labelling_the_same_answer_at_once_count_it_once(store, store_url):
    ingest(store, [answer_line(f"r{i}", "Coat") for i in range(20)])
    other = st.Store(store_url)
    outcomes, errors = [], []

    def label(s, value):
        for i in range(20):
            try:
                outcomes.append(s.label("fashion_cnn", st.parse_body({"request_id": f"r{i}", "label": value}))[0]["status"])
            except st.LabelConflict:
                outcomes.append("conflict")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=label, args=(s, v)) for s, v in ((store, "Coat"), (other, "Coat"), (other, 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert not errors, errors
    assert outcomes.count("recorded") == 20 and len(outcomes) == 60
    version = store.summary("fashion_cnn")["versions"]["1.0"]
    assert (version["labelled"], version["correct"]) == (20, 20)


def test_wilson_interval():
    assert st.wilson(36, 40) == [0.7695, 0.9604]
    assert st.wilson(0, 0) is None and st.wilson(0, 5)[0] == 0.0 and st.wilson(5, 5)[1] == 1.0
    assert st.redact("postgresql://u:secret@db/x") == "postgresql://u:***@db/x"
    assert st.engine_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
