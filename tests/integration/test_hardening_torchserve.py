"""Issue 14, TorchServe's own settings (straight to the frontend, no gateway in front).

- Workflow API: TorchServe 0.12 cannot turn it off and ``enable_model_api=false`` does not gate
  ``POST /workflows``; a workflow archive is Python the server imports. With the management key,
  each archive below must be refused (4xx) and its handler never imported (it writes a marker).
  Before this fix (``allowed_urls=file://.*/model_store/[^/]+\\.mar``, workflow store = model store)
  cases a_mar, case_variant, percent_encoded and dotdot_then_name all imported their handler.
- Large bodies: N concurrent max-size uploads leave the frontend alive and serving (with the old
  ``-Xmx512m`` 32 of them ended the JVM in 10 s).
- Logs: bounded bytes per request, nothing written twice, size-based rotation with a fixed count.

docs/hardening-torchserve.md has the measurements.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests

from scripts.deploy.harness import EXAMPLE, REPO, Server, make_server
from scripts.ops.tsclient import read_properties

LOG4J = REPO / "deploy" / "torchserve" / "log4j2.xml"
MARKER_WAIT_S = 5.0
# Concurrent max-size bodies one frontend holds with the shipped vmargs (the gateway admits no more).
N_LARGE_BODIES = 16
MAX_FRONTEND_RSS = 2 * 2**30  # heap 1 GiB + direct 512 MiB + JVM ~200 MB, measured 1.39 GB at N=16
LOG_BYTES_PER_REQUEST = 200  # measured ~10 B after, ~3,000 B before (TorchServe's default log4j2.xml)


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    srv = make_server(base / "srv")
    srv.start()
    try:
        yield base, srv
    finally:
        srv.stop()


def frontend(srv: Server) -> psutil.Process:
    return psutil.Process(srv.pid())


def key(srv: Server, kind: str) -> str:
    return json.loads((srv.workdir / "key_file.json").read_text())[kind]["key"]


# --- 1. workflow API ------------------------------------------------------------------------------
def build_workflow_archive(path: Path, marker: Path) -> Path:
    """A workflow archive whose handler writes ``marker`` when a worker imports it.

    ``.war``: a zip; any other name: a tar.gz whose first path component TorchServe strips.
    """
    handler = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
               "def pre(data, context):\n    return data\ndef post(data, context):\n    return data\n")
    spec = "models:\n  min-workers: 1\n  max-workers: 1\n  batch-size: 1\ndag:\n  pre: [post]\n"
    manifest = {"createdOn": "01/01/2025 00:00:00", "archiverVersion": "0.2.15",
                "workflow": {"workflowName": "planted", "specFile": "spec.yaml", "handler": "handler.py"}}
    files = {"WAR-INF/MANIFEST.json": json.dumps(manifest), "spec.yaml": spec, "handler.py": handler}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".war":
        with zipfile.ZipFile(path, "w") as z:
            for name, text in files.items():
                z.writestr(name, text)
    else:
        with tarfile.open(path, "w:gz") as t:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(f"wf/{name}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


def workflow_attempts(base: Path, store: Path, case: str) -> list[str]:
    """URLs to POST, in order, for one case (archives planted as a side effect)."""
    evil = base / "evil" / "model_store"
    marker = base / f"marker_{case}"
    if case == "a_mar":  # any folder named model_store (the finding)
        return [f"file://{build_workflow_archive(evil / 'a.mar', marker)}"]
    if case == "b_war":
        return [f"file://{build_workflow_archive(evil / 'b.war', marker)}"]
    if case == "case_variant":  # allowed_urls match case-insensitively: /X/SRV/MODEL_STORE is not /x/srv/model_store
        variant = base / store.parent.name.upper() / store.name.upper() / "c.mar"
        return [f"file://{build_workflow_archive(variant, marker)}"]
    if case == "percent_encoded":  # Java decodes %2e%2e%2f when it opens a file: URL
        build_workflow_archive(evil / "d.mar", marker)
        return [f"file://{store}/%2e%2e%2f%2e%2e%2fevil%2fmodel_store%2fd.mar"]
    if case == "dotdot_then_name":  # ".." is refused only after the copy; the copy is then loaded by name
        build_workflow_archive(evil / "e.mar", marker)
        return [f"file://{store}/../../evil/model_store/e.mar", "e.mar"]
    if case == "in_model_store":  # even an archive in the real store (workflow_store=/dev/null)
        return [f"file://{build_workflow_archive(store / 'f.mar', marker)}", "f.mar"]
    raise ValueError(case)


WORKFLOW_CASES = ["a_mar", "b_war", "case_variant", "percent_encoded", "dotdot_then_name", "in_model_store"]


def post_workflows(srv: Server, base: Path, case: str) -> tuple[list[int], bool]:
    """POST /workflows with the management key for each URL of ``case``: statuses, whether the marker appeared."""
    marker = base / f"marker_{case}"
    statuses = []
    for i, url in enumerate(workflow_attempts(base, srv.model_store, case)):
        resp = requests.post(f"{srv.client.endpoints.management}/workflows",
                             params={"url": url, "workflow_name": f"wf_{case}_{i}"},
                             headers={"Authorization": f"Bearer {key(srv, 'management')}"}, timeout=120)
        statuses.append(resp.status_code)
    deadline = time.monotonic() + MARKER_WAIT_S
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.25)
    return statuses, marker.exists()


def test_configs_close_workflow_code_loading(tmp_path):
    shipped = read_properties(REPO / "config.properties")
    assert shipped["workflow_store"] == "/dev/null"
    assert shipped["allowed_urls"] == "(?!)", "the static file allows no archive URL (it cannot name the store)"
    from scripts.deploy.harness import write_config

    props = read_properties(write_config(tmp_path, tmp_path / "model_store"))
    assert props["workflow_store"] == "/dev/null"
    assert props["allowed_urls"] == (rf"(?-i)file://\Q{(tmp_path / 'model_store').resolve()}\E"
                                     r"/[A-Za-z0-9_][A-Za-z0-9_.-]*\.mar")


@pytest.mark.parametrize("case", WORKFLOW_CASES)
def test_workflow_archive_is_never_loaded(hardened, case):
    base, srv = hardened
    statuses, imported = post_workflows(srv, base, case)
    assert not imported, f"{case}: the workflow handler was imported (statuses {statuses})"
    assert all(400 <= s < 500 for s in statuses), f"{case}: {statuses}"
    workflows = requests.get(f"{srv.client.endpoints.management}/workflows",
                             headers={"Authorization": f"Bearer {key(srv, 'management')}"}, timeout=30)
    assert workflows.json().get("workflows", []) == []


# --- 3. logs ----------------------------------------------------------------------------------------
def test_log_config_rotates_by_size_with_a_fixed_count():
    root = ET.parse(LOG4J).getroot()
    files = root.findall("./Appenders/RollingFile")
    assert {f.get("name") for f in files} >= {"ts_log", "model_log", "access_log", "model_metrics", "ts_metrics"}
    bound = 0
    for f in files:
        size = f.find("./Policies/SizeBasedTriggeringPolicy")
        keep = f.find("./DefaultRolloverStrategy")
        assert size is not None and keep is not None and f.find("./Policies/TimeBasedTriggeringPolicy") is None
        assert "%i" in f.get("filePattern") and "%d" not in f.get("filePattern"), "size-based names only"
        number, unit = size.get("size").split()
        bound += int(number) * {"KB": 2**10, "MB": 2**20}[unit] * (1 + int(keep.get("max")))
    assert bound <= 200 * 2**20, f"disk bound {bound / 2**20:.0f} MiB"
    loggers = {lg.get("name"): lg for lg in root.findall("./Loggers/Logger")}
    for name in ("org.pytorch.serve", "ACCESS_LOG", "MODEL_LOG"):
        assert loggers[name].get("additivity") == "false", f"{name} lines would be written twice"
    assert "-Dlog4j.configurationFile=deploy/torchserve/log4j2.xml" in read_properties(REPO / "config.properties")["vmargs"]


def log_bytes(srv: Server) -> int:
    return sum(p.stat().st_size for p in (srv.workdir / "logs").rglob("*") if p.is_file())


def test_logs_grow_little_per_request_and_no_line_twice(hardened):
    _, srv = hardened
    assert f"-Dlog4j.configurationFile={LOG4J}" in frontend(srv).cmdline()
    body, n, threads = EXAMPLE.read_bytes(), 1000, 4
    url = f"{srv.client.endpoints.inference}/predictions/fashion_cnn"
    headers = {"Authorization": f"Bearer {key(srv, 'inference')}", "Content-Type": "image/png"}
    statuses: Counter = Counter()
    before = log_bytes(srv)

    def send(count: int) -> None:
        with requests.Session() as s:
            for _ in range(count):
                statuses[s.post(url, data=body, headers=headers, timeout=60).status_code] += 1

    workers = [threading.Thread(target=send, args=(n // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    time.sleep(1.0)
    grown = log_bytes(srv) - before
    assert statuses == {200: n}
    assert grown / n < LOG_BYTES_PER_REQUEST, f"{grown} bytes of logs for {n} requests"
    lines = (srv.workdir / "logs" / "ts_log.log").read_text(errors="replace").splitlines()
    doubled = sum(1 for a, b in zip(lines, lines[1:]) if a == b and a.startswith("20"))
    assert doubled == 0, f"{doubled} lines written twice in ts_log.log"


# --- 2. large bodies --------------------------------------------------------------------------------
def test_concurrent_max_size_uploads_leave_the_frontend_serving(hardened):
    _, srv = hardened
    java = frontend(srv)
    size = int(srv.properties()["max_request_size"]) - 1024
    body = bytes(range(256)) * (size // 256)
    url = f"{srv.client.endpoints.inference}/predictions/fashion_cnn"
    headers = {"Authorization": f"Bearer {key(srv, 'inference')}", "Content-Type": "application/octet-stream"}
    outcomes: Counter = Counter()
    peak, done = [java.memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], java.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    def upload() -> None:
        with requests.Session() as s:
            for _ in range(2):  # two rounds: N bodies in flight at once, twice
                try:
                    outcomes[s.post(url, data=body, headers=headers, timeout=90).status_code] += 1
                except requests.RequestException as exc:
                    outcomes[type(exc).__name__] += 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=upload) for _ in range(N_LARGE_BODIES)]
    try:
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=240)
    finally:
        done.set()
        sampler.join()
    assert java.is_running() and java.status() != psutil.STATUS_ZOMBIE, f"frontend died: {outcomes}"
    assert all(isinstance(k, int) and 400 <= k < 500 for k in outcomes), outcomes  # 415: not an image
    assert sum(outcomes.values()) == 2 * N_LARGE_BODIES
    assert peak[0] < MAX_FRONTEND_RSS, f"frontend RSS peaked at {peak[0] / 2**20:.0f} MiB"
    answer = requests.post(url, data=EXAMPLE.read_bytes(), timeout=60,
                           headers={**headers, "Content-Type": "image/png"})
    assert answer.status_code == 200, answer.text
