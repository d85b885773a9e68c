"""`make serve` / `make stop` run scripts.deploy.serve: start, wait for a real answer, print how to call it; twice is safe."""

from __future__ import annotations

import subprocess
import sys

import requests

from scripts.deploy.harness import REPO, build_store, write_config


def serve(action: str, config, workdir, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.deploy.serve", action, "--config", str(config), "--workdir", str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_serve_start_twice_then_stop(tmp_path):
    import os

    store = build_store(tmp_path / "model_store")
    config = write_config(tmp_path, store)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    first = serve("start", config, tmp_path, env)
    try:
        assert first.returncode == 0, first.stderr
        assert "starting:" in first.stdout and "Ankle boot" in first.stdout
        assert 'curl -H "Authorization: Bearer $TOKEN" -T examples/ankle_boot.png http://127.0.0.1:' in first.stdout
        assert (tmp_path / "key_file.json").exists()
        second = serve("start", config, tmp_path, env)
        assert second.returncode == 0 and "starting:" not in second.stdout and "Ankle boot" in second.stdout
        assert serve("status", config, tmp_path, env).returncode == 0
    finally:
        stopped = serve("stop", config, tmp_path, env)
    assert stopped.returncode == 0
    inference = [line.split("=", 1)[1] for line in config.read_text().splitlines() if line.startswith("inference_address=")][0]
    try:
        requests.get(f"{inference}/ping", timeout=5)
        raise AssertionError("the server still answers after stop")
    except requests.ConnectionError:
        pass
