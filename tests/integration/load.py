"""Clients sending predictions back to back while something changes under them (a rollout, a promotion),
every answer kept with when it was sent and which version gave it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Answer:
    sent: float
    done: float
    status: int | None
    version: str | None
    tta_views: int | None = None
    error: str | None = None


class Load:
    """``threads`` clients, each calling ``send(client)`` with its own ``connect()`` back to back until stopped
    (at most ``limit_s``). Subclasses say how to connect and what to send."""

    def __init__(self, threads: int, limit_s: float = 240.0):
        self.limit_s = limit_s
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def connect(self):
        raise NotImplementedError

    def send(self, client):
        """One prediction request: its ``requests.Response``."""
        raise NotImplementedError

    def run(self) -> None:
        client = self.connect()
        deadline = time.monotonic() + self.limit_s
        while not self.stopping.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                resp = self.send(client)
                ok = resp.status_code == 200
                answer = Answer(sent, time.monotonic(), resp.status_code, resp.headers.get("X-Model-Version"),
                                resp.json().get("tta_views") if ok else None, None if ok else resp.text[:200])
            except Exception as exc:  # a dropped connection is a failed request too
                answer = Answer(sent, time.monotonic(), None, None, None, repr(exc))
            with self.lock:
                self.answers.append(answer)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in self.threads)

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def between(self, start: float, end: float) -> list[Answer]:
        """The answers to requests sent at or after ``start`` and answered by ``end``."""
        return [a for a in self.answers if start <= a.sent and a.done <= end]
