"""The demo's backend against a tiny local HTTP server standing in for the gateway (no TorchServe, no
browser): what a person reads when the server is down, refuses the key, or cannot answer, the key
file re-read after a 401, answers kept in order when sent in parallel, and the badges' sentences.
The real stack and a real browser: tests/integration/test_demo.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts.demo.backend import DemoBackend, badges, caption
from scripts.deploy.harness import free_ports

GOOD = "g" * 43


def answer(label: str = "Coat", confidence: float = 0.97, uncertain: bool = False, ood: bool = False) -> dict:
    return {"label": label, "class_index": 4, "confidence": confidence, "uncertain": uncertain,
            "out_of_distribution": ood, "ood_score": 7.3 if ood else -6.0,
            "top_k": [{"label": label, "class_index": 4, "probability": confidence}], "tta_views": 2}


class FakeGateway(BaseHTTPRequestHandler):
    """Accepts the key in ``server.key``; ``server.status`` forces an error; the body's text is echoed as the label."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - /ping needs no key
        self.reply(200, {"status": "Healthy"})

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(self.headers.get("Authorization"))
        if self.server.on_request:
            self.server.on_request(self)
        if self.headers.get("Authorization") != f"Bearer {self.server.key}":
            return self.reply(401, {"code": 401, "type": "Unauthorized", "message": "Token Authorization failed"})
        if self.server.status:
            return self.reply(self.server.status, {"code": self.server.status, "type": "Error", "message": self.server.message})
        return self.reply(200, answer(label=body.decode()))

    def reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    server.key, server.status, server.message, server.seen, server.on_request = GOOD, None, "", [], None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": GOOD}, "management": {"key": "m" * 43}}))
    try:
        yield server, DemoBackend(f"http://127.0.0.1:{server.server_address[1]}", key_file), key_file
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_comes_back_with_the_key_sent_by_the_server_side(fake):
    server, backend, _ = fake
    outcome = backend.classify(b"Sneaker")
    assert outcome.ok and outcome.answer["label"] == "Sneaker" and not outcome.error
    assert server.seen == [f"Bearer {GOOD}"]


def test_a_server_that_is_down_is_said_plainly():
    backend = DemoBackend(f"http://127.0.0.1:{free_ports(1)[0]}", Path("/nonexistent/key_file.json"), timeout=5)
    outcome = backend.classify(b"x")
    assert not outcome.ok and "is not reachable" in outcome.error and "make serve" in outcome.error
    assert "Traceback" not in outcome.error and "Error(" not in outcome.error
    assert "is not reachable" in backend.readiness()


def test_a_refused_key_is_read_again_once_then_said_plainly(fake):
    server, backend, key_file = fake
    server.key = "k" * 43  # the server was given other keys
    outcome = backend.classify(b"x")
    assert outcome.status == 401 and "refused the inference key" in outcome.error and str(key_file) in outcome.error
    assert len(server.seen) == 2, "one retry, no more (the gateway slows down clients that fail repeatedly)"


def test_a_key_file_rewritten_after_a_refusal_is_used(fake):
    server, backend, key_file = fake
    new = "n" * 43
    server.key = new

    def regenerate(_request):  # the keys are regenerated while the first request is in flight
        key_file.write_text(json.dumps({"inference": {"key": new}}))
    server.on_request = regenerate
    outcome = backend.classify(b"Bag")
    assert outcome.ok and outcome.answer["label"] == "Bag"
    assert server.seen == [f"Bearer {GOOD}", f"Bearer {new}"]
    assert any("re-read" in note for note in outcome.notes)


def test_a_missing_key_file_says_where_it_should_be(fake):
    _, backend, key_file = fake
    key_file.unlink()
    outcome = backend.classify(b"x")
    assert "No inference key" in outcome.error and "make serve" in outcome.error
    assert "No inference key" in backend.readiness()


@pytest.mark.parametrize("status,expected", [
    (503, "no model server behind it could answer now"),
    (502, "no model server behind it could answer now"),
    (415, "could not use this file (HTTP 415): not an image"),
    (500, "The server failed (HTTP 500)"),
])
def test_server_errors_are_one_sentence_with_the_servers_message(fake, status, expected):
    server, backend, _ = fake
    server.status, server.message = status, "not an image" if status == 415 else "busy"
    outcome = backend.classify(b"x")
    assert not outcome.ok and outcome.status == status and expected in outcome.error


def test_many_images_come_back_in_order(fake):
    _, backend, _ = fake
    labels = [f"image {i}" for i in range(12)]
    outcomes = backend.classify_many([label.encode() for label in labels], parallel=6)
    assert [o.answer["label"] for o in outcomes] == labels


def test_badges_say_what_each_flag_means():
    assert [b[1] for b in badges(answer())] == ["Confident"]
    uncertain = badges(answer(confidence=0.5, uncertain=True), threshold=0.78)
    assert [b[1] for b in uncertain] == ["Uncertain"] and "below the model's threshold of 78.0 %" in uncertain[0][2]
    ood = badges({**answer(confidence=0.9, uncertain=True, ood=True), "ood": {"threshold": 2.11}}, threshold=0.78)
    assert [b[1] for b in ood] == ["Out of distribution"] and "does not look like anything" in ood[0][2]
    both = badges(answer(confidence=0.4, uncertain=True, ood=True), threshold=0.78)
    assert [b[1] for b in both] == ["Out of distribution", "Uncertain"]


def test_gallery_captions_are_short():
    from scripts.demo.backend import Outcome

    assert caption(Outcome(answer=answer())) == "Coat 97 %"
    assert caption(Outcome(answer=answer(confidence=0.5, uncertain=True, ood=True))) == "Coat 50 % · OOD"
    assert caption(Outcome(error="The server failed")).startswith("error: ")


def test_the_review_tab_says_plainly_when_the_feedback_api_is_down_and_escapes_what_it_shows(tmp_path):
    from scripts.demo.review import Item, ReviewBackend, choices, item_html

    port = free_ports(1)[0]
    down = ReviewBackend(f"http://127.0.0.1:{port}", tmp_path / "key_file.json").next_item()
    assert down.answer is None and "not reachable" in down.error and "make serve" in down.error
    assert 'id="demo-review-error"' in item_html(down)
    shown = item_html(Item(answer={"request_id": "<b>x</b>", "index": 2, "label": 'Bag"><script>', "confidence": 0.5,
                                   "version": "1.0", "reason": "uncertain"}))
    assert "<script>" not in shown and "&lt;b&gt;x&lt;/b&gt;" in shown and 'data-index="2"' in shown
    assert "confidence threshold" in shown and ", image 2" in shown
    assert 'id="demo-review-empty"' in item_html(Item())
    assert choices(["Coat"]) == ["Coat", "not a garment"]
