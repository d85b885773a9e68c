"""The generated alerts on a real Prometheus scraping the real stack (gateway + TorchServe).

Prometheus (Debian's package) runs on loopback with a private data folder, scraping the
session gateway's metrics port every second and evaluating rules every second. The rules
are the generator's, with short windows and ``for: 0s`` (``--window``, ``--for``): the
same expressions and thresholds as deploy/monitoring/, only faster. Traffic:

1. random chunks of the held-out split: no model alert fires (and the window holds at
   least MIN_SAMPLES predictions, so "no alert" is a verdict, not a lack of data);
2. only ankle boots: PredictionDrift (labels) and OneClassDominates fire;
3. only non-garments (scripts/evaluate/outliers.py, no download): OutOfDistributionRateHigh fires.

Prometheus is stopped by its PID in every case.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from scripts.deploy.harness import REPO, free_ports
from scripts.ops import alerts, drift

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install "
                                                           "prometheus; scripts/setup_env.sh does it)")
MODEL = "fashion_cnn"
BOOT = REPO / "examples" / "ankle_boot.png"
WINDOW_S = 20
QUALITY = {"PredictionDrift", "PredictionDriftWarning", "OneClassDominates", "MeanConfidenceLow",
           "UncertainRateHigh", "OutOfDistributionRateHigh"}
# also silent under clean traffic; the replica and worker alerts can legitimately flap on a loaded 2-core host
SILENT_TOO = {"ServerErrorBurst", "RejectionBurst", "MetricsEndpointDown"}


def png(img) -> bytes:
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Traffic(threading.Thread):
    """Sends {"instances": [...]} requests of ``chunk`` images drawn from the current pool until stopped."""

    def __init__(self, client, pool: list[bytes], chunk: int = 32):
        super().__init__(daemon=True)
        self.client, self.pool, self.chunk = client, pool, chunk
        self.stop_event, self.sent, self.errors = threading.Event(), 0, []
        self.rng = random.Random(15)

    def switch(self, pool: list[bytes]) -> None:
        self.pool = pool

    def run(self) -> None:
        while not self.stop_event.is_set():
            pool = self.pool
            batch = self.rng.sample(pool, min(self.chunk, len(pool)))
            doc = {"instances": [{"image": base64.b64encode(b).decode()} for b in batch]}
            try:
                resp = self.client.predict(MODEL, json.dumps(doc).encode(), content_type="application/json")
                self.sent += len(resp.json())
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc))
                time.sleep(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)


class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                                      "--storage.tsdb.retention.time=1h"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # this process only, by its PID
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()

    def get(self, path: str, **params) -> dict:
        resp = requests.get(f"{self.url}{path}", params=params, timeout=5)
        resp.raise_for_status()
        return resp.json()["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def firing(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in self.get("/api/v1/alerts")["alerts"]:
            if a["state"] == "firing":
                out.setdefault(a["labels"]["alertname"], []).append(a["labels"])
        return out

    def wait_until(self, what: str, check, deadline_s: float, every: float = 1.0):
        end, last = time.monotonic() + deadline_s, None
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                last = check()
                if last:
                    return last
            except requests.RequestException as exc:
                last = repr(exc)
            time.sleep(every)
        raise AssertionError(f"{what}: not within {deadline_s:g} s (last: {last}; firing: {self.firing()})")


def value(result: list[dict], **labels) -> float | None:
    for r in result:
        if all(r["metric"].get(k) == v for k, v in labels.items()):
            return float(r["value"][1])
    return None


def test_alerts_fire_on_skewed_traffic_and_stay_silent_on_held_out_traffic(gateway, holdout, tmp_path):
    started = time.monotonic()
    out = tmp_path / "monitoring"
    args = alerts.get_args_parser().parse_args([
        "--out", str(out), "--target", gateway.metrics.removeprefix("http://"), "--window", f"{WINDOW_S}s",
        "--ops-window", f"{WINDOW_S}s", "--restart-window", "60s", "--for", "0s",
        "--scrape-interval", "1s", "--evaluation-interval", "1s"])
    assert alerts.main(args) == 0
    assert "for: 0s" in (out / "alerting_rules.yml").read_text()

    from scripts.evaluate.outliers import non_garment_sets

    images, _ = holdout
    held_out = [png(img) for img in images]
    outliers = [png(img) for imgs in non_garment_sets(25, 15).values() for img in imgs]
    boots = [BOOT.read_bytes()]
    client = gateway.client(timeout=60)
    # every label's counter exists before Prometheus first scrapes (increase() misses a series' first value)
    warm = {"instances": [{"image": base64.b64encode(b).decode()} for b in held_out[:64]]}
    client.predict(MODEL, json.dumps(warm).encode(), content_type="application/json")

    prom = Prometheus(out / "prometheus.yml", tmp_path / "prometheus-data", tmp_path / "prometheus.log")
    traffic = Traffic(client, held_out)
    timings = {}
    try:
        prom.wait_until("target scraped", lambda: value(prom.query(f'up{{job="{alerts.JOB}"}}')) == 1, 30)
        traffic.start()

        # 1. held-out traffic: enough predictions in the window for a verdict, and no model alert
        t0 = time.monotonic()
        prom.wait_until(f">= {drift.MIN_SAMPLES} held-out predictions in the {WINDOW_S} s window",
                        lambda: (value(prom.query(alerts.PRED)) or 0) >= drift.MIN_SAMPLES * 1.2, 60)
        psi_seen = []
        for _ in range(5):  # several evaluations of a full window of held-out traffic
            firing = prom.firing()
            psi = {r["metric"]["part"]: float(r["value"][1]) for r in prom.query(alerts.PSI)}
            n = value(prom.query(alerts.PRED))
            psi_seen.append((n, psi))
            assert n >= drift.MIN_SAMPLES, (n, psi)
            assert not (set(firing) & (QUALITY | SILENT_TOO)), (firing, psi, n)
            time.sleep(1.0)
        timings["held-out"] = time.monotonic() - t0

        # 2. one class only
        t0 = time.monotonic()
        traffic.switch(boots)

        def skew_fired():
            firing = prom.firing()
            drifted = {a.get("part") for a in firing.get("PredictionDrift", [])}
            dominant = {a.get("Label") for a in firing.get("OneClassDominates", [])}
            return firing if "labels" in drifted and "Ankle boot" in dominant else None

        prom.wait_until("PredictionDrift{part=labels} and OneClassDominates{Label=Ankle boot}", skew_fired, 50)
        timings["one class"] = time.monotonic() - t0

        # 3. non-garments
        t0 = time.monotonic()
        traffic.switch(outliers)
        prom.wait_until("OutOfDistributionRateHigh", lambda: prom.firing().get("OutOfDistributionRateHigh"), 50)
        timings["non-garments"] = time.monotonic() - t0
        ood_ratio = value(prom.query(alerts.OOD))
        final = sorted(prom.firing())
    finally:
        traffic.stop()
        prom.stop()
    assert not traffic.errors, traffic.errors[:5]
    print(f"\nheld-out windows (n, PSI per part): {psi_seen[-1]}; OOD share under non-garments {ood_ratio}; "
          f"phases {({k: round(v, 1) for k, v in timings.items()})}; total {time.monotonic() - started:.1f} s; "
          f"{traffic.sent} predictions; firing at the end: {final}")
    assert prom.proc.poll() is not None


# --- labelled accuracy (issue 23) ----------------------------------------------------------------------------------
FEEDBACK_WINDOW_S = 20


class Labeller(threading.Thread):
    """Sends {"instances": [...]} of ``chunk`` (image, true label) pairs from the current pool, then labels every
    answer with its true label through POST /feedback (the feedback key), until stopped."""

    def __init__(self, client, pool: list[tuple[bytes, str]], chunk: int = 32):
        super().__init__(daemon=True)
        self.client, self.pool, self.chunk = client, pool, chunk
        self.stop_event, self.labelled, self.errors = threading.Event(), 0, []
        self.right = self.wrong = 0
        self.wrong_images: list[tuple[bytes, str]] = []
        self.right_images: list[tuple[bytes, str]] = []
        self.rng = random.Random(23)

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            batch = self.rng.sample(self.pool, min(self.chunk, len(self.pool)))
            doc = {"instances": [{"image": base64.b64encode(b).decode()} for b, _ in batch]}
            rid = f"alert-{n}-{self.rng.random():.6f}"[:60]
            n += 1
            try:
                resp = self.client.predict(MODEL, json.dumps(doc).encode(), content_type="application/json",
                                           headers={"X-Request-ID": rid})
                answers = resp.json()
                for (image, truth), answer in zip(batch, answers):
                    ok = answer["label"] == truth
                    self.right, self.wrong = self.right + ok, self.wrong + (not ok)
                    (self.right_images if ok else self.wrong_images).append((image, truth))
                labels = [{"request_id": rid, "index": i, "label": truth} for i, (_, truth) in enumerate(batch)]
                posted = self.client.label(MODEL, labels)
                self.labelled += len(posted.json()["labels"])
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc))
                time.sleep(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)


def test_labelled_accuracy_alert_fires_on_worse_labels_and_stays_silent_on_held_out_labels(gateway, holdout, tmp_path):
    """The generated rules (feedback window shortened to 20 s) on a real Prometheus scraping the stack: held-out images
    labelled with their true labels keep LabelledAccuracyLow silent while the window holds enough labels for a verdict;
    a stream of the images the model gets wrong more often than held-out ones (its own mistakes and as many right
    answers), labelled truthfully, makes it fire."""
    from scripts.train.data import FASHION_MNIST_CLASSES

    out = tmp_path / "monitoring"
    args = alerts.get_args_parser().parse_args([
        "--out", str(out), "--target", gateway.metrics.removeprefix("http://"), "--window", f"{WINDOW_S}s",
        "--ops-window", f"{WINDOW_S}s", "--restart-window", "60s", "--feedback-window", f"{FEEDBACK_WINDOW_S}s",
        "--for", "0s", "--scrape-interval", "1s", "--evaluation-interval", "1s"])
    assert alerts.main(args) == 0
    images, labels = holdout
    held_out = [(png(img), FASHION_MNIST_CLASSES[int(y)]) for img, y in zip(images, labels)]
    client = gateway.client(timeout=60)
    prom = Prometheus(out / "prometheus.yml", tmp_path / "prometheus-data", tmp_path / "prometheus.log")
    labeller = Labeller(client, held_out)
    started = time.monotonic()
    try:
        prom.wait_until("target scraped", lambda: value(prom.query(f'up{{job="{alerts.JOB}"}}')) == 1, 30)
        labeller.start()
        labelling = time.monotonic()
        # 1. held-out images with their true labels: a full window of them, enough expected errors for a verdict, and
        # silence at every evaluation
        fired_early = []

        def full_window() -> bool:
            fired_early.extend(prom.firing().get("LabelledAccuracyLow", []))
            return (time.monotonic() - labelling >= FEEDBACK_WINDOW_S
                    and (value(prom.query(alerts.FB_ERRORS), ModelVersion="1.0") or 0) >= 15)

        prom.wait_until("a full window of held-out labels with >= 10 expected errors", full_window, 90)
        assert not fired_early, fired_early
        seen = []
        for _ in range(5):
            z = value(prom.query(alerts.FB_Z), ModelVersion="1.0")
            errors = value(prom.query(alerts.FB_ERRORS), ModelVersion="1.0")
            seen.append((round(z, 2) if z is not None else None, round(errors or 0, 1)))
            assert errors and errors >= alerts.Policy().feedback_min_expected_errors, seen
            assert "LabelledAccuracyLow" not in prom.firing(), seen
            time.sleep(1.0)
        held_out_accuracy = labeller.right / max(1, labeller.right + labeller.wrong)
        # 2. the model's own mistakes and as many right answers, labelled truthfully: about half right
        assert len(labeller.wrong_images) >= 20, (labeller.right, labeller.wrong)
        worse = labeller.wrong_images[:200] + labeller.right_images[:len(labeller.wrong_images[:200])]
        labeller.pool = worse
        t0 = time.monotonic()
        prom.wait_until("LabelledAccuracyLow{ModelVersion=1.0}",
                        lambda: any(a.get("ModelVersion") == "1.0" for a in prom.firing().get("LabelledAccuracyLow", [])),
                        FEEDBACK_WINDOW_S * 3)
        fired_after = time.monotonic() - t0
        z_worse = value(prom.query(alerts.FB_Z), ModelVersion="1.0")
    finally:
        labeller.stop()
        prom.stop()
    assert not labeller.errors, labeller.errors[:5]
    print(f"\nheld-out labels (z, expected errors) per evaluation: {seen}; held-out accuracy of this run "
          f"{held_out_accuracy:.3f}; worse stream fired after {fired_after:.1f} s at z = {z_worse:.1f}; "
          f"{labeller.labelled} labels in {time.monotonic() - started:.0f} s")
