"""Every ``scripts.ops.ctl`` subcommand (and the scripts.ops.client / scripts.ops.workers entry points) against a real TorchServe.

The server runs the shipped config (token auth on, model API off) with two versions
of fashion_cnn listed in load_models, the way several versions are served without
the register API. Its own gRPC ports keep it clear of any other TorchServe on
this machine (the shipped 7070/7071 would collide).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
from PIL import Image

from scripts.deploy.harness import REPO, free_ports, make_two_version_server
from scripts.ops import ctl

EXAMPLES = sorted((REPO / "examples").glob("*.png"))
BOOT = REPO / "examples" / "ankle_boot.png"
MODEL = "fashion_cnn"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = make_two_version_server(tmp_path_factory.mktemp("ctl"))
    server.start()
    try:
        wait_all_ready(server)
        yield server
    finally:
        server.stop()


def wait_all_ready(server, deadline_s: float = 180.0) -> None:
    """start() returns when the default version answers; wait for every version's workers too."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        described = server.client.describe(MODEL)
        if all(d["workers"] and all(w["status"] == "READY" for w in d["workers"]) for d in described):
            return
        time.sleep(0.5)
    raise TimeoutError(f"workers not READY: {[(d['modelVersion'], [w['status'] for w in d['workers']]) for d in described]}")


def run_ctl(srv, capsys, *argv: str) -> tuple[int, str]:
    """``python -m scripts.ops.ctl argv... --config --workdir`` in-process -> (exit code, stdout)."""
    capsys.readouterr()
    code = ctl.main([*argv, "--config", str(srv.config), "--workdir", str(srv.workdir)])
    out = capsys.readouterr()
    return code, out.out + out.err


def run_cli(srv, module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv, "--config", str(srv.config), "--workdir", str(srv.workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)


def raw_default(srv) -> requests.Response:
    return srv.client.predict(MODEL, BOOT.read_bytes())


def versions(srv) -> dict[str, dict]:
    return {d["modelVersion"]: d for d in srv.client.describe(MODEL)}


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def send_instances(srv, images: list[bytes], chunk: int = 64) -> int:
    """Classify images in {"instances": [...]} requests; returns how many answers came back."""
    answered = 0
    for i in range(0, len(images), chunk):
        doc = {"instances": [{"image": base64.b64encode(b).decode()} for b in images[i:i + chunk]]}
        resp = srv.client.predict(MODEL, json.dumps(doc).encode(), content_type="application/json")
        answered += len(resp.json())
    return answered


# --- status / versions / set-default / scale ------------------------------------------
def test_status_shows_versions_workers_pids_and_memory(srv, capsys):
    code, out = run_ctl(srv, capsys, "status")
    assert code == 0, out
    assert "Healthy" in out and "fashion_cnn 1.0 (default)" in out and "fashion_cnn 2.0 " in out
    code, out = run_ctl(srv, capsys, "status", "--json")
    state = json.loads(out)["models"][MODEL]
    described = versions(srv)
    assert {v["version"] for v in state} == {"1.0", "2.0"}
    for v in state:
        pids = sorted(w["pid"] for w in v["workers"])
        assert pids == sorted(w["pid"] for w in described[v["version"]]["workers"]) and len(pids) == 2
        for w in v["workers"]:
            assert w["status"] == "READY" and psutil.pid_exists(w["pid"])
            assert w["rss_mib"] > 50  # a worker with torch loaded; TorchServe itself says memoryUsage 0
        assert v["queue_free"] == 256 and v["batch_size"] == 8
    assert [v["default"] for v in sorted(state, key=lambda v: v["version"])] == [True, False]


def test_set_default_switches_the_answering_version_and_guards_against_503(srv, capsys):
    assert raw_default(srv).headers["X-Model-Version"] == "1.0"
    code, out = run_ctl(srv, capsys, "set-default", MODEL, "2.0")
    assert code == 0 and "fashion_cnn 2.0 (default)" in out, out
    assert raw_default(srv).headers["X-Model-Version"] == "2.0"

    code, out = run_ctl(srv, capsys, "set-default", MODEL, "9.9")
    assert code == 1 and "no version 9.9" in out

    # a version with no worker is refused as default (TorchServe itself would accept it and answer 503)
    code, out = run_ctl(srv, capsys, "scale", MODEL, "--version", "1.0", "--workers", "0")
    assert code == 0, out
    v1 = versions(srv)["1.0"]
    assert (v1["minWorkers"], v1["maxWorkers"], v1["workers"]) == (0, 0, [])
    code, out = run_ctl(srv, capsys, "set-default", MODEL, "1.0")
    assert code == 1 and "no READY worker" in out
    assert raw_default(srv).headers["X-Model-Version"] == "2.0"

    # scaling the default version to zero is refused too
    code, out = run_ctl(srv, capsys, "scale", MODEL, "--workers", "0")
    assert code == 1 and "default version" in out
    assert len(versions(srv)["2.0"]["workers"]) == 2

    code, out = run_ctl(srv, capsys, "scale", MODEL, "--version", "1.0", "--workers", "1")
    assert code == 0 and "fashion_cnn 1.0  archive fashion_cnn.mar  workers 1/1 READY (min 1, max 1)" in out, out
    code, out = run_ctl(srv, capsys, "set-default", MODEL, "1.0")
    assert code == 0, out
    assert raw_default(srv).headers["X-Model-Version"] == "1.0"


def test_workers_cli_scales_and_shows_state(srv):
    done = run_cli(srv, "scripts.ops.workers", MODEL, "--workers", "2", "--version", "1.0")
    assert done.returncode == 0, done.stderr
    v1 = versions(srv)["1.0"]
    assert (v1["minWorkers"], v1["maxWorkers"]) == (2, 2)
    assert [w["status"] for w in v1["workers"]] == ["READY", "READY"]  # synchronous: up when it returns
    shown = run_cli(srv, "scripts.ops.workers", "--json")
    state = {v["version"]: v for v in json.loads(shown.stdout)}
    assert shown.returncode == 0 and len(state["1.0"]["workers"]) == 2 and state["1.0"]["default"]


def test_versions_lists_both(srv, capsys):
    code, out = run_ctl(srv, capsys, "versions", MODEL, "--json")
    state = {v["version"]: v for v in json.loads(out)}
    assert code == 0 and set(state) == {"1.0", "2.0"}
    assert state["2.0"]["archive"] == "fashion_cnn_v2.mar" and state["1.0"]["default"]
    code, out = run_ctl(srv, capsys, "versions", "no_such_model")
    assert code == 2 and "404" in out


# --- predict / client / health -----------------------------------------------------------------
def test_predict_prints_what_the_server_answers_for_each_file(srv, capsys):
    code, out = run_ctl(srv, capsys, "predict", *map(str, EXAMPLES))
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == len(EXAMPLES)
    for path, line in zip(EXAMPLES, lines):
        answer = srv.client.predict(MODEL, path.read_bytes()).json()
        assert line.startswith(f"{path}: {answer['label']} {answer['confidence']:.3f}"), line
        assert ("UNCERTAIN" in line) == answer["uncertain"] and line.endswith("[v1.0]")


def test_predict_json_top_k_no_tta_and_failures(srv, capsys, tmp_path):
    code, out = run_ctl(srv, capsys, "predict", str(BOOT), "--json", "--top-k", "5", "--no-tta", "--version", "2.0")
    [result] = json.loads(out)
    assert code == 0 and result["status"] == 200 and result["model_version"] == "2.0"
    assert len(result["response"]["top_k"]) == 5 and result["response"]["tta_views"] == 1
    assert result["response"]["label"] == "Ankle boot"

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, out = run_ctl(srv, capsys, "predict", str(BOOT), str(text), str(tmp_path / "missing.png"))
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{BOOT}: Ankle boot")
    assert "FAILED 415 UnsupportedMediaType" in lines[1]
    assert lines[2].startswith(f"{tmp_path / 'missing.png'}: FAILED") and "FileNotFoundError" in lines[2]


def test_client_cli_classifies_many_images(srv):
    done = run_cli(srv, "scripts.ops.client", str(EXAMPLES[0]), str(EXAMPLES[1]), "--top-k", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(EXAMPLES[0]), str(EXAMPLES[1])]
    assert all("then " in line for line in lines)  # the runner-up of top-2 is shown


def test_health_is_token_aware_and_fails_cleanly(srv, capsys, tmp_path):
    code, out = run_ctl(srv, capsys, "health")
    assert code == 0 and "Healthy" in out and "fashion_cnn 1.0: 2 READY" in out
    # without the key file the same server refuses /ping: unhealthy, exit 1, no traceback
    capsys.readouterr()
    code = ctl.main(["health", "--config", str(srv.config), "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1 and "UNHEALTHY" in out and "Token Authorization failed" in out
    # nothing listening
    dead = tmp_path / "dead.properties"
    port = free_ports(1)[0]
    dead.write_text(f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{port}\n")
    code = ctl.main(["health", "--config", str(dead), "--workdir", str(srv.workdir)])
    assert code == 1 and "UNHEALTHY" in capsys.readouterr().out


# --- metrics / drift -------------------------------------------------------------------------------
def test_metrics_summarizes_known_requests(srv, capsys, tmp_path):
    before = tmp_path / "before.prom"
    code, _ = run_ctl(srv, capsys, "metrics", "--save", str(before))
    assert code == 0 and "PredictionsPerLabel" in before.read_text()
    bag = (REPO / "examples" / "bag.png").read_bytes()
    labels = [srv.client.predict(MODEL, bag).json()["label"] for _ in range(2)]
    assert srv.client.predict(MODEL, b"%PDF-1.4 not an image", check=False).status_code == 415
    time.sleep(1.0)  # the frontend reads metric lines from the workers' logs
    code, out = run_ctl(srv, capsys, "metrics", "--since", str(before), "--version", "1.0")
    assert code == 0
    assert f"fashion_cnn 1.0 since {before}: 2 predictions, 1 rejected requests" in out, out
    assert f"{labels[0]} 2 (100.0%)" in out and "unsupported_format 1" in out
    assert "inference p50 ~" in out
    code, out = run_ctl(srv, capsys, "metrics", "--since", str(before), "--json")
    data = json.loads(out)
    assert data["1.0"]["predictions"] == 2 and data["1.0"]["rejected"]["unsupported_format"] == 1
    assert data["2.0"]["predictions"] == 0  # nothing went to 2.0 meanwhile


@pytest.fixture(scope="module")
def holdout_pngs(holdout):
    images, _ = holdout
    return [png(img) for img in images]


def test_drift_ok_for_the_held_out_split_alert_for_one_class(srv, capsys, tmp_path, holdout_pngs):
    s0, s1 = tmp_path / "s0.prom", tmp_path / "s1.prom"
    run_ctl(srv, capsys, "metrics", "--save", str(s0))
    assert send_instances(srv, holdout_pngs) == len(holdout_pngs)
    time.sleep(1.0)
    run_ctl(srv, capsys, "metrics", "--save", str(s1))

    code, out = run_ctl(srv, capsys, "drift", "--before", str(s0), "--json")
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "OK", out
    assert report["n_live"] == len(holdout_pngs) and report["version"] == "1.0"
    assert report["reference"].endswith("fashion_cnn.mar")  # the served archive's reference.json
    # the server classifies the held-out split as the exporter did: the same distributions
    assert report["labels"]["psi"] < 0.01 and report["confidence"]["psi"] < 0.01

    boots = [BOOT.read_bytes()] * 250
    send_instances(srv, boots, chunk=50)
    time.sleep(1.0)
    code, out = run_ctl(srv, capsys, "drift", "--before", str(s1))
    assert code == 1, out
    assert "labels: PSI" in out and "verdict: ALERT" in out

    # two saved snapshots, reference from the TorchScript file: no server needed for the numbers
    code, out = run_ctl(srv, capsys, "drift", "--before", str(s0), "--after", str(s1), "--reference",
                        str(REPO / "models" / "fashion_cnn.pt"))
    assert code == 0 and "verdict: OK" in out


def test_drift_window_catches_skewed_live_traffic(srv, capsys):
    stop = threading.Event()
    sent = []

    def traffic():
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            sent.append(send_instances(srv, [BOOT.read_bytes()] * 40))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.5)
        code, out = run_ctl(srv, capsys, "drift", "--window", "4", "--json")
    finally:
        stop.set()
        thread.join(timeout=60)
    report = json.loads(out[out.index("{"):])
    assert report["n_live"] >= 200, report["n_live"]
    assert code == 1 and report["verdict"] == "ALERT" and report["labels"]["verdict"] == "ALERT"
    share = {b["bin"]: b["live_share"] for b in report["labels"]["bins"]}
    assert share["Ankle boot"] == 1.0


def test_drift_without_traffic_gives_no_verdict(srv, capsys):
    code, out = run_ctl(srv, capsys, "drift", "--version", "2.0", "--min-samples", "100000")
    assert code == 0 and "INSUFFICIENT" in out
