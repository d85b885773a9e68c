"""End to end through the real TorchServe: HTTP in, JSON out, token auth on."""

from __future__ import annotations

import io
import json

import requests
from PIL import Image

from tests.integration.server import EXAMPLE


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
    assert set(body) == {"label", "class_index", "confidence", "uncertain", "top_k", "tta_views"}
    assert body["label"] == "Ankle boot" and body["class_index"] == 9
    assert 0.0 <= body["confidence"] <= 1.0 and body["uncertain"] is (body["confidence"] < 0.5)
    assert len(body["top_k"]) == 3 and body["top_k"][0]["label"] == body["label"]
    assert body["tta_views"] == 2


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
