"""`make serve` / `make status` / `make stop` run scripts.deploy.serve: the gateway and its replicas,
a real answer before it returns, how to call it; starting twice is safe; stop leaves nothing running."""

from __future__ import annotations

import psutil
import requests

from scripts.deploy.harness import free_ports
from tests.integration.stack import Stack


def test_serve_start_twice_status_then_stop(tmp_path):
    stack = Stack(tmp_path, free_ports(4), 1)
    first = stack.serve("start")
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        assert "starting the gateway" in first.stdout and "Ankle boot" in first.stdout
        assert f'--data-binary @examples/coat.png {stack.inference}/predictions/fashion_cnn' in first.stdout
        assert stack.key_file.exists() and stack.key_file.stat().st_mode & 0o077 == 0
        keys = stack.key_file.read_text()
        second = stack.serve("start")
        assert second.returncode == 0 and "starting" not in second.stdout and "Ankle boot" in second.stdout
        assert stack.key_file.read_text() == keys  # the service credential survives a second start
        status = stack.serve("status")
        assert status.returncode == 0 and "replica 0: ready" in status.stdout and ":READY" in status.stdout, status.stdout
        pids = [stack.state()["pid"], stack.state()["gateway_pid"], stack.state()["grpc_pid"]] + [
            r["pid"] for r in stack.replica_state()]
        assert all(psutil.pid_exists(p) for p in pids)
    finally:
        stopped = stack.serve("stop")
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"pid {pid} survived stop"
    for url in (stack.inference, stack.management, stack.metrics):
        try:
            requests.get(f"{url}/ping", timeout=5)
            raise AssertionError(f"{url} still answers after stop")
        except requests.ConnectionError:
            pass
    assert stack.serve("status").returncode == 1
