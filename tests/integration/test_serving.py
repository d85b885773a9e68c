"""End to end through the real TorchServe: HTTP in, JSON out, token auth on."""

from __future__ import annotations

import io
import json

import requests
from PIL import Image

from scripts.deploy.harness import EXAMPLE
from tests.conftest import SHIPPED_VIEWS, same_answer


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_requests_without_a_token_are_refused(server):
    for url in (f"{server.client.endpoints.inference}/ping",
                f"{server.client.endpoints.inference}/predictions/fashion_cnn"):
        resp = requests.post(url, data=EXAMPLE.read_bytes(), timeout=30) if "predictions" in url else requests.get(url, timeout=30)
        assert resp.status_code in (400, 401), resp.text
        assert "Token Authorization failed" in resp.text


def test_png_prediction_has_the_documented_shape(client):
    resp = client.predict("fashion_cnn", EXAMPLE.read_bytes())
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"label", "class_index", "confidence", "uncertain", "out_of_distribution", "ood_score", "top_k",
                         "tta_views"}
    assert body["label"] == "Ankle boot" and body["class_index"] == 9
    threshold = client.predict("fashion_cnn", EXAMPLE.read_bytes(), headers={"describe": "true"}).json()["threshold"]
    assert body["out_of_distribution"] is False and isinstance(body["ood_score"], float)
    assert 0.0 <= body["confidence"] <= 1.0 and body["uncertain"] is (body["confidence"] < threshold)
    assert len(body["top_k"]) == 3 and body["top_k"][0]["label"] == body["label"]
    assert body["tta_views"] == 1  # a confident image: the TTA gate keeps it at the identity view
    forced = client.predict("fashion_cnn", EXAMPLE.read_bytes(), headers={"X-TTA": "all"}).json()
    assert forced["tta_views"] == SHIPPED_VIEWS and forced["label"] == body["label"]


def test_jpeg_gets_the_same_label_as_png(client):
    image = Image.open(EXAMPLE)
    jpeg = encode(image, "JPEG", quality=95)
    png_answer = client.predict("fashion_cnn", EXAMPLE.read_bytes()).json()
    jpeg_answer = client.predict("fashion_cnn", jpeg, content_type="image/jpeg").json()
    assert jpeg_answer["label"] == png_answer["label"]
    assert abs(jpeg_answer["confidence"] - png_answer["confidence"]) < 0.1


def test_options_by_header_multipart_and_json(client):
    data = EXAMPLE.read_bytes()
    by_header = client.predict("fashion_cnn", data, headers={"x-tta": "OFF", "X-TOP-K": "5"}).json()
    assert by_header["tta_views"] == 1 and len(by_header["top_k"]) == 5
    url = f"{client.endpoints.inference}/predictions/fashion_cnn"
    auth = {"Authorization": f"Bearer {client.key('inference')}"}
    multipart = requests.post(url, files={"file": ("a.png", data, "image/png")}, data={"top_k": "2"}, headers=auth, timeout=30)
    assert multipart.status_code == 200 and len(multipart.json()["top_k"]) == 2
    import base64

    doc = {"image": "data:image/png;base64," + base64.b64encode(data).decode(), "top_k": 4, "tta": False}
    as_json = client.predict("fashion_cnn", json.dumps(doc).encode(), content_type="application/json").json()
    assert as_json["tta_views"] == 1 and len(as_json["top_k"]) == 4
    assert as_json["label"] == by_header["label"]


def test_answers_name_the_model_version(client):
    resp = client.predict("fashion_cnn", EXAMPLE.read_bytes())
    assert resp.headers.get("X-Model-Version") == "1.0"


def test_concurrent_requests_share_batches_and_a_garbage_one_fails_alone(client):
    from concurrent.futures import ThreadPoolExecutor

    files = sorted((EXAMPLE.parent).glob("*.png"))
    payloads = [files[i % len(files)].read_bytes() for i in range(15)]
    alone = {i: client.predict("fashion_cnn", payloads[i]).json() for i in range(len(files))}
    payloads.insert(7, b"\x89PNG\r\n\x1a\n garbage that claims to be a PNG")
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda d: client.predict("fashion_cnn", d, check=False), payloads))
    assert [r.status_code for r in responses].count(200) == 15
    bad = responses[7]
    assert bad.status_code == 400 and bad.json()["type"] == "InvalidImage"
    for i, resp in enumerate(r for j, r in enumerate(responses) if j != 7):
        assert same_answer(resp.json(), alone[i % len(files)])


def test_explanations_return_decodable_heatmap_overlay_and_input_pngs(client):
    import base64

    import numpy as np

    plain = client.predict("fashion_cnn", EXAMPLE.read_bytes()).json()
    resp = client.predict("fashion_cnn", EXAMPLE.read_bytes(), explain=True)
    assert resp.status_code == 200
    body = resp.json()
    exp = body.pop("explanation")
    body.pop("views")
    body.pop("ood")
    assert same_answer(body, plain)
    assert exp["method"] == "grad-cam-x-gradient" and exp["class_index"] == 9 and exp["label"] == "Ankle boot"
    pngs = {k: Image.open(io.BytesIO(base64.b64decode(exp[k]))) for k in ("heatmap_png", "overlay_png", "input_png")}
    assert {k: (img.mode, img.size) for k, img in pngs.items()} == {
        "heatmap_png": ("L", (28, 28)), "overlay_png": ("RGB", (28, 28)), "input_png": ("L", (28, 28))}
    assert np.asarray(pngs["heatmap_png"]).max() == 255
    other = client.predict("fashion_cnn", EXAMPLE.read_bytes(), explain=True, headers={"X-Explain-Class": "Sandal"}).json()
    assert other["explanation"]["class_index"] == 5 and other["explanation"]["heatmap_png"] != exp["heatmap_png"]
    bad = client.predict("fashion_cnn", EXAMPLE.read_bytes(), explain=True, headers={"X-Explain-Class": "hat"}, check=False)
    assert bad.status_code == 400 and bad.json()["type"] == "InvalidExplainClass" and '"Sandal"' in bad.json()["message"]


def test_scaling_to_three_workers_and_back(client):
    def ready(entry):
        return [w for w in entry["workers"] if w["status"] == "READY"]

    before = client.describe("fashion_cnn")[0]
    try:
        client.scale("fashion_cnn", 3)
        after = client.describe("fashion_cnn")[0]
        assert len(ready(after)) == 3 and after["minWorkers"] == 3 and after["maxWorkers"] == 3
        assert client.predict("fashion_cnn", EXAMPLE.read_bytes()).json()["label"] == "Ankle boot"
    finally:
        client.scale("fashion_cnn", before["minWorkers"])
    restored = client.describe("fashion_cnn")[0]
    assert len(ready(restored)) == before["minWorkers"] == 2


def test_custom_metrics_are_published_on_the_metrics_endpoint(client):
    from scripts.ops.tsclient import parse_prometheus

    client.predict("fashion_cnn", EXAMPLE.read_bytes())
    client.predict("fashion_cnn", b"", check=False)
    names = {name for name, _, _ in parse_prometheus(client.metrics_text())}
    for metric in ("PredictionsPerLabel", "UncertainPredictions", "RejectedRequests"):
        assert metric in names or metric == "UncertainPredictions", metric
    assert {"TopConfidence_bucket", "TopConfidence_count", "StageLatency_bucket"} <= names


def test_http_accuracy_on_the_held_out_split_equals_offline_accuracy(client, holdout, tmp_path):
    import yaml

    from handler.loader import int8_path
    from scripts.evaluate.http_accuracy import REPO, accuracy, holdout_pngs, http_predictions, offline_predictions
    from tests.conftest import DATA

    pngs, labels = holdout_pngs(DATA)
    served = REPO / "models" / "fashion_cnn.pt"  # the file the shipped config's handler.precision serves
    if (yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())["handler"] or {}).get("precision") == "int8":
        served = int8_path(served)
    for tta in (False, True):
        offline = offline_predictions(served, pngs, tta)
        online = http_predictions(client, "fashion_cnn", pngs, tta, concurrency=8)
        assert [p["class_index"] for p in online] == [p["class_index"] for p in offline]
        assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(online, offline)) < 1e-4
        assert accuracy(online, labels) == accuracy(offline, labels) > 0.85
