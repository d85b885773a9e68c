"""The gateway's configuration without a server: the worker-cap rule, the rendered nginx config, keys, metrics merging."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.deploy.gateway import GatewaySettings, Hop, HopSettings, ReplicaRoute, nginx_binary, render, service_keys
from scripts.deploy.supervisor import merge_metrics
from scripts.ops import capacity
from scripts.ops.capacity import Capacity, frontend_bound_mb

HERE = Capacity(worker_mb=570.0, frontend_mb=1792.0, memory_mb=24105.0, cores=2, replicas=1)


def test_the_cap_is_the_smaller_of_the_memory_and_core_caps():
    assert HERE.memory_cap == (24105 * 0.75 - 1792 - 256) // 570 == 28
    assert HERE.core_cap == 8 and HERE.cap == 8
    two = Capacity(570.0, 1792.0, 24105.0, 2, 2)
    assert two.core_cap == 4 and two.cap == 4
    small = Capacity(570.0, 1792.0, 4096.0, 16, 1)  # a 4 GiB container on a 16-core node: memory decides
    assert small.memory_cap == 1 and small.cap == 1
    tiny = Capacity(570.0, 1792.0, 2048.0, 2, 1)  # not even one worker fits: still 1, never 0
    assert tiny.memory_cap < 1 and tiny.cap == 1


def test_check_allows_one_to_cap_and_zero_only_when_forced():
    assert HERE.check(1) is None and HERE.check(8) is None
    for bad in (9, 1000, -1):
        assert "must be 1 to 8" in HERE.check(bad)
    assert "force=true" in HERE.check(0) and HERE.check(0, force=True) is None
    assert Capacity.from_json(json.loads(json.dumps(HERE.to_json()))) == HERE


def test_the_frontend_counts_at_what_its_vmargs_let_it_grow_to():
    assert frontend_bound_mb("-Xmx1g -XX:MaxDirectMemorySize=512m -XX:+ExitOnOutOfMemoryError") == 1024 + 512 + 256
    assert frontend_bound_mb("-Xmx512m") == 512 + 512 + 256  # direct memory defaults to the heap size
    assert frontend_bound_mb("-XX:+UseG1GC") is None
    assert frontend_bound_mb("-Xmx2048k") == pytest.approx(2 + 2 + 256)


def settings(tmp_path, replicas: int = 1, cap: Capacity = HERE) -> GatewaySettings:
    return GatewaySettings(run_dir=tmp_path / "run", log_dir=tmp_path / "logs", public_inference="127.0.0.1:18080",
                           public_management="127.0.0.1:18081", public_metrics="127.0.0.1:18082",
                           max_body=10 * 2**20, capacity=cap, replicas=list(range(replicas)))


def route(i: int) -> ReplicaRoute:
    return ReplicaRoute(i, f"http://127.0.0.1:{9100 + i}", f"http://127.0.0.1:{9200 + i}",
                        f"http://127.0.0.1:{9300 + i}", f"infkey{i}" * 4, f"mgmtkey{i}" * 4)


KEYS = {"inference": {"key": "i" * 43}, "management": {"key": "m" * 43}}
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                                 reason="nginx is not installed (make install installs it)")


def nginx_accepts(run: Path, conf: str, name: str) -> subprocess.CompletedProcess:
    (run / "tmp").mkdir(parents=True, exist_ok=True)
    path = run / name
    path.write_text(conf)
    return subprocess.run([nginx_binary(), "-t", "-q", "-c", str(path), "-p", str(run), "-e", str(run / "error.log")],
                          capture_output=True, text=True)


@needs_nginx
@pytest.mark.parametrize("replicas", [1, 2])
def test_rendered_gateway_config_is_accepted_by_nginx_and_holds_no_replica_state(tmp_path, replicas):
    conf = render(settings(tmp_path, replicas), KEYS)
    (tmp_path / "logs").mkdir()
    check = nginx_accepts(tmp_path / "run", conf, "nginx.conf")
    assert check.returncode == 0, check.stderr
    assert "@{" not in conf
    # The gateway knows the replicas only by their hops' sockets: no replica port or key, so nothing a
    # replica's restart changes (the gateway is never reloaded while it serves).
    assert "infkey" not in conf and "mgmtkey" not in conf and ":91" not in conf and ":92" not in conf
    assert conf.count("replica-0.sock max_fails=0;") == (2 if replicas == 1 else 1)  # one replica: listed twice
    for i in range(replicas):
        assert f"replica-{i}.management.sock" in conf and f"replica-{i}.metrics.sock" in conf


@needs_nginx
def test_a_hop_injects_its_replicas_keys_and_out_of_rotation_answers_503_that_say_why(tmp_path):
    hop = Hop(HopSettings(tmp_path / "run", 1, route(1)))
    assert hop.write()  # nginx -t accepted it (write raises otherwise)
    serving = hop.conf.read_text()
    assert hop.conf.stat().st_mode & 0o077 == 0  # it holds the replica's keys
    assert '"Bearer infkey1' in serving and '"Bearer mgmtkey1' in serving and "127.0.0.1:9101" in serving
    assert "error_page 507 = @worker_died" in serving and "ReplicaNotReady" not in serving
    predictions = serving.split("# --- predictions")[1].split("# --- management")[0]
    assert 'proxy_set_header Connection "";' in predictions  # else nginx closes every connection to TorchServe
    assert not hop.write()  # unchanged: no reload needed

    hop.settings = HopSettings(tmp_path / "run", 1, route(1), serving=False, why="not ready")
    assert hop.write()
    closed = hop.conf.read_text()
    predictions = closed.split("# --- predictions")[1].split("# --- management")[0]
    assert "Replica 1 is not ready" in predictions and "proxy_pass" not in predictions
    assert '"Bearer mgmtkey1' in closed  # a replica out of rotation can still be managed (scaled back from 0 workers)

    hop.settings = HopSettings(tmp_path / "run", 1, None, serving=False, why="restarting")
    assert hop.write()
    restarting = hop.conf.read_text()
    assert "Bearer" not in restarting and "Replica 1 is restarting" in restarting


def test_the_worker_count_pattern_admits_exactly_one_to_the_cap(tmp_path):
    conf = render(settings(tmp_path), KEYS)
    pattern = re.search(r'"~\^\\\+\?0\*\(([0-9|]+)\)\$" 1;', conf).group(1)
    allowed = re.compile(rf"^\+?0*({pattern})$")
    assert all(allowed.match(v) for v in ("1", "8", "08", "+3"))
    assert not any(allowed.match(v) for v in ("0", "9", "10", "80", "1000", "-1", "", "1e3", " 1"))


def test_service_keys_are_made_once_strong_and_private(tmp_path):
    path = tmp_path / "key_file.json"
    keys = service_keys(path)
    assert path.stat().st_mode & 0o077 == 0
    assert all(len(keys[k]["key"]) >= 43 for k in ("inference", "management"))
    assert service_keys(path) == keys  # kept across restarts
    path.write_text(json.dumps({"inference": {"key": "short"}, "management": {"key": "x" * 43}}))
    assert service_keys(path)["inference"]["key"] != "short"  # a weak file of ours is replaced


def test_merged_metrics_name_each_family_once_and_label_every_sample():
    text = ("# HELP ts_requests Requests.\n# TYPE ts_requests counter\n"
            'ts_requests{model="m",} 3.0\nts_up 1\n')
    merged = merge_metrics({0: text, 1: text.replace("3.0", "5.0")})
    assert merged.count("# TYPE ts_requests counter") == 1
    assert 'ts_requests{replica="0",model="m",} 3.0' in merged and 'ts_requests{replica="1",model="m",} 5.0' in merged
    assert 'ts_up{replica="1"} 1' in merged


def test_machine_figures_are_positive():
    assert capacity.machine_cores() >= 1 and capacity.machine_memory_mb() > 0


@needs_nginx
def test_the_grpc_port_and_the_v2_errors_are_rendered_and_accepted_by_nginx(tmp_path):
    conf = render(GatewaySettings(**{**settings(tmp_path).__dict__, "public_grpc": "127.0.0.1:17070"}), KEYS)
    (tmp_path / "logs").mkdir()
    check = nginx_accepts(tmp_path / "run", conf, "nginx.conf")
    assert check.returncode == 0, check.stderr
    grpc = conf.split("# --- public gRPC")[1]
    assert "listen 127.0.0.1:17070 http2" in grpc and f"grpc_pass unix:{tmp_path / 'run' / 'grpc.sock'};" in grpc
    assert "add_header grpc-status 16 always" in grpc  # a missing credential: UNAUTHENTICATED, never INTERNAL/UNAVAILABLE
    # every v2 location answers the gateway's own errors in the v2 shape
    for block in re.findall(r"location [^{]*/v2[^{]*\{(.*?)\n        \}", conf, re.S):
        assert "error_page 401 = @v2_401;" in block and "error_page 413 = @v2_413;" in block, block
    assert """location @v2_401 { default_type application/json;""" in conf and '{"error": "Send the service credential' in conf
    assert "# --- gRPC: not served" in render(settings(tmp_path), KEYS)  # none without a public gRPC address


# --- feedback (issue 23) ----------------------------------------------------------------------------------------------
FEEDBACK_KEYS = {**KEYS, "feedback": {"key": "f" * 43}}


@needs_nginx
def test_feedback_routes_check_the_feedback_key_before_the_body_and_export_only_on_the_management_port(tmp_path):
    conf = render(settings(tmp_path), FEEDBACK_KEYS)
    (tmp_path / "logs").mkdir()
    check = nginx_accepts(tmp_path / "run", conf, "nginx.conf")
    assert check.returncode == 0, check.stderr
    assert '"~^Bearer ' + "f" * 43 + '$" 1;' in conf
    inference = conf.split("# --- public inference")[1].split("# --- public management")[0]
    management = conf.split("# --- public management")[1].split("# --- metrics")[0]
    route = inference.split("location ~ ^/feedback/")[1].split("location = /_auth/feedback")[0]
    assert "auth_request /_auth/feedback;" in route and "(/summary|/review)?$" in route and "export" not in route
    assert "client_max_body_size 1m;" in route and "X-Feedback-Api feedback" in route
    assert 'proxy_set_header Authorization "";' in route  # the labeller's key goes no further
    assert "feedback.sock" in route and "error_page 502 504 = @feedback_down" in route
    assert "error_page 401 = @unauthorized;" in route  # its own error_page drops the server's: JSON 401s kept
    assert "if ($feedback_ok = 0) { return 401; }" in inference
    # the management port (its key, checked for the whole server): the summary and the labelled set
    assert "(summary|export|compare)$" in management and "X-Feedback-Api management" in management
    assert "auth_request /_auth/management;" in management


@needs_nginx
def test_without_a_feedback_key_or_recording_feedback_answers_503_saying_why(tmp_path):
    (tmp_path / "logs").mkdir()
    for keys, opts, why in ((KEYS, {}, "no feedback key"), (FEEDBACK_KEYS, {"feedback": "recording is off"}, "recording is off")):
        conf = render(dataclasses.replace(settings(tmp_path), **opts), keys)
        assert nginx_accepts(tmp_path / "run", conf, "nginx.conf").returncode == 0
        assert "unix:" + str(tmp_path / "run" / "feedback.sock") not in conf and why in conf and "FeedbackUnavailable" in conf


def test_a_key_file_without_a_feedback_key_gains_one_and_keeps_the_others(tmp_path):
    path = tmp_path / "key_file.json"
    old = {"inference": {"key": "i" * 43}, "management": {"key": "m" * 43}}
    path.write_text(json.dumps(old))
    keys = service_keys(path)
    assert keys["inference"] == old["inference"] and keys["management"] == old["management"]
    assert len(keys["feedback"]["key"]) >= 43 and len({keys[k]["key"] for k in keys}) == 3
    assert json.loads(path.read_text()) == keys and service_keys(path) == keys
    path.write_text(json.dumps(old))  # a read-only mounted Secret without one is used as it is (/feedback: 503)
    path.chmod(0o440)
    assert service_keys(path) == old and json.loads(path.read_text()) == old
