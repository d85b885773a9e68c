"""Expired keys: raw requests fail, ctl and the client renew them through the token API and succeed.

A server with ``token_expiration_min=1`` (the smallest useful value): the test waits
until its inference and management keys have expired (about a minute, bounded at
90 s), so this file takes ~1.5 minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import requests

from scripts.deploy.harness import REPO, make_server
from scripts.ops import ctl
from scripts.ops.tsclient import TorchServeClient

BOOT = REPO / "examples" / "ankle_boot.png"
REFUSED = "Token Authorization failed"


def expires_at(entry: dict) -> datetime:
    """'2026-11-22T02:55:51.031423569Z' (nanoseconds) -> aware datetime."""
    text = re.sub(r"(\.\d{6})\d*", r"\1", entry["expiration time"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text)


def test_expired_keys_are_renewed_by_the_client_and_ctl(tmp_path_factory, tmp_path, capsys):
    srv = make_server(tmp_path_factory.mktemp("tokens"), overrides={"token_expiration_min": "1"})
    srv.start()
    try:
        key_file = srv.workdir / "key_file.json"
        old = json.loads(key_file.read_text())
        inf, mgmt = srv.client.endpoints.inference, srv.client.endpoints.management

        def raw(url: str, key: str, method: str = "GET", **kw) -> requests.Response:
            return requests.request(method, url, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)

        # fresh keys work as they are
        assert raw(f"{inf}/ping", old["inference"]["key"]).status_code == 200
        wait = max(expires_at(old["inference"]), expires_at(old["management"])) - datetime.now(timezone.utc)
        assert wait.total_seconds() < 90, old  # token_expiration_min=1 took effect
        time.sleep(max(wait.total_seconds(), 0) + 1.5)

        # expired: TorchServe refuses the old keys, with 400 (not 401)
        for resp in (raw(f"{inf}/ping", old["inference"]["key"]),
                     raw(f"{inf}/predictions/fashion_cnn", old["inference"]["key"], "POST", data=BOOT.read_bytes()),
                     raw(f"{mgmt}/models", old["management"]["key"])):
            assert resp.status_code in (400, 401) and REFUSED in resp.text, (resp.status_code, resp.text)

        # the client CLI (a separate process, as a user runs it) renews the inference key and succeeds
        done = subprocess.run([sys.executable, "-m", "scripts.ops.client", str(BOOT),
                               "--config", str(srv.config), "--workdir", str(srv.workdir)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(f"{BOOT}: Ankle boot")
        after_client = json.loads(key_file.read_text())
        assert after_client["inference"]["key"] != old["inference"]["key"]
        assert expires_at(after_client["inference"]) > datetime.now(timezone.utc)
        assert after_client["API"] == old["API"]  # the API key never expires and is not rotated

        # ctl status goes through the management API: it renews the management key
        capsys.readouterr()
        assert ctl.main(["status", "--config", str(srv.config), "--workdir", str(srv.workdir)]) == 0
        assert "fashion_cnn 1.0 (default)" in capsys.readouterr().out
        after_ctl = json.loads(key_file.read_text())
        assert after_ctl["management"]["key"] != old["management"]["key"]

        # the renewed keys work raw; the old ones still do not
        assert raw(f"{inf}/ping", after_ctl["inference"]["key"]).status_code == 200
        assert raw(f"{mgmt}/models", after_ctl["management"]["key"]).status_code == 200
        assert raw(f"{inf}/ping", old["inference"]["key"]).status_code in (400, 401)
        assert ctl.main(["health", "--config", str(srv.config), "--workdir", str(srv.workdir)]) == 0

        # expired keys and a wrong API key: renewal is refused, health says so (exit 1, no traceback)
        forged = {**old, "API": {"key": "not-the-api-key"}}
        (tmp_path / "key_file.json").write_text(json.dumps(forged))
        capsys.readouterr()
        assert ctl.main(["health", "--config", str(srv.config), "--workdir", str(tmp_path)]) == 1
        assert "UNHEALTHY" in capsys.readouterr().out
        assert json.loads(key_file.read_text())["inference"] == after_ctl["inference"]  # nothing rotated

        # several clients sharing the key file hit a refused key at once: one renewal, no failure.
        # (Refused without waiting again: renew by hand, then put the now-invalid key back in the file.)
        stale_file = key_file.read_text()
        assert raw(f"{mgmt}/token?type=inference", old["API"]["key"]).status_code == 200
        key_file.write_text(stale_file)
        assert raw(f"{inf}/ping", after_ctl["inference"]["key"]).status_code in (400, 401)
        clients = [TorchServeClient.from_config(srv.config, srv.workdir) for _ in range(4)]
        start = threading.Barrier(len(clients))

        def predict(client: TorchServeClient) -> int:
            start.wait()
            return client.predict("fashion_cnn", BOOT.read_bytes(), check=False).status_code

        with ThreadPoolExecutor(len(clients)) as pool:
            assert list(pool.map(predict, clients)) == [200] * len(clients)
        assert sum(c.renewals for c in clients) == 1
    finally:
        srv.stop()
