"""The gateway's configuration without a server: the worker-cap rule, the rendered nginx config, keys, metrics merging."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from scripts.deploy import capacity
from scripts.deploy.capacity import Capacity, frontend_bound_mb
from scripts.deploy.gateway import GatewaySettings, ReplicaRoute, nginx_binary, render, service_keys
from scripts.deploy.supervisor import merge_metrics

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
    routes = [ReplicaRoute(i, f"http://127.0.0.1:{9100 + i}", f"http://127.0.0.1:{9200 + i}",
                           f"http://127.0.0.1:{9300 + i}", f"infkey{i}" * 4, f"mgmtkey{i}" * 4) for i in range(replicas)]
    return GatewaySettings(run_dir=tmp_path / "run", log_dir=tmp_path / "logs", public_inference="127.0.0.1:18080",
                           public_management="127.0.0.1:18081", public_metrics="127.0.0.1:18082",
                           max_body=10 * 2**20, capacity=cap, replicas=routes)


KEYS = {"inference": {"key": "i" * 43}, "management": {"key": "m" * 43}}


@pytest.mark.parametrize("replicas", [1, 2])
def test_rendered_config_is_accepted_by_nginx(tmp_path, replicas):
    if shutil.which("nginx") is None and not (shutil.which("/usr/sbin/nginx")):
        pytest.skip("nginx is not installed (make install installs it)")
    conf = render(settings(tmp_path, replicas), KEYS)
    (tmp_path / "run" / "tmp").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    path = tmp_path / "run" / "nginx.conf"
    path.write_text(conf)
    check = subprocess.run([nginx_binary(), "-t", "-q", "-c", str(path), "-p", str(tmp_path / "run"),
                            "-e", str(tmp_path / "run" / "error.log")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "@{" not in conf
    for i in range(replicas):
        assert f'"Bearer infkey{i}' in conf and f'"Bearer mgmtkey{i}' in conf  # each hop injects its replica's key
    assert conf.count("replica-0.sock max_fails=0;") == (2 if replicas == 1 else 0)  # one replica: listed twice


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
