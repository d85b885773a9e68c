"""scripts.bench.memory without a server: its arguments, venv checks, labels, round totals and table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scripts.bench import memory
from tests.conftest import REPO


def test_defaults_are_the_running_venv_and_the_shipped_archive():
    args = memory.get_args_parser().parse_args([])
    assert args.venv == [Path(sys.prefix)]
    assert args.mar == [REPO / "model_store" / "fashion_cnn.mar"]
    assert args.out == REPO / "build" / "bench" / "memory.json"
    assert (args.hey_seconds, args.concurrency, args.rounds) == (5.0, 16, 2)


def test_several_venvs_and_archives():
    args = memory.get_args_parser().parse_args(["--venv", ".venv", "/x/cpuvenv", "--mar", "a.mar", "b.mar",
                                                "--hey-seconds", "0"])
    assert args.venv == [Path(".venv"), Path("/x/cpuvenv")]
    assert args.mar == [Path("a.mar"), Path("b.mar")]
    assert args.hey_seconds == 0


def test_the_running_venv_is_a_serving_venv():
    python, torchserve = memory.venv_tools(Path(sys.prefix))
    assert python.name == "python" and torchserve.name == "torchserve"


def test_a_folder_without_torchserve_is_refused(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    with pytest.raises(SystemExit, match="torchserve"):
        memory.venv_tools(tmp_path)


def test_labels_are_unique_folder_names():
    taken: set[str] = set()
    assert memory.label_for(Path("/a/.venv"), taken) == ".venv"
    assert memory.label_for(Path("/b/.venv"), taken) == ".venv-2"
    assert memory.label_for(Path("/w/cpuvenv/"), taken) == "cpuvenv"


def test_rounds_combine_over_their_real_durations():
    rounds = [{"model": "m", "concurrency": 16, "seconds": 5.0, "total_s": 5.0, "ok_per_s": 100.0, "status": {200: 500},
               "p50_ms": 10.0, "p99_ms": 30.0, "responses": 500, "error_count": 0, "load1": 1.0},
              {"model": "m", "concurrency": 16, "seconds": 5.0, "total_s": 10.0, "ok_per_s": 200.0, "status": {200: 2000},
               "p50_ms": 20.0, "p99_ms": 50.0, "responses": 2000, "error_count": 0, "load1": 2.0}]
    out = memory.combine(rounds)
    assert out["ok_per_s"] == pytest.approx(2500 / 15)
    assert out["ok_per_s_median"] == pytest.approx(150.0)
    assert out["p99_ms"] == 50.0 and out["rounds"] == 2 and out["load1_rounds"] == [1.0, 2.0]


def worker(pid, rss, uss):
    return {"model": "fashion_cnn", "pid": pid, "exe": "/v/bin/python", "rss_mib": rss, "uss_mib": uss, "pss_mib": uss + 50,
            "libtorch": "/v/lib/torch/lib/libtorch_cpu.so", "nvidia_libs_mapped": 0}


def test_table_has_every_worker_the_jvm_totals_and_throughput():
    run = {"label": "cpuvenv", "torch": "2.13.0+cpu", "models": ["fashion_cnn"], "ready_s": 7.0, "workers_use_venv": True,
           "predictions": {"fashion_cnn": {"status": {200: 20}, "label": "Ankle boot", "confidence": 0.963546}},
           "memory": {"workers": [worker(1, 282.4, 173.3), worker(2, 282.3, 173.2)], "frontend_jvm": {"pid": 9, "rss_mib": 201.3},
                      "workers_rss_mib": 564.7, "workers_uss_mib": 346.5, "workers_pss_mib": 446.5},
           "memory_after_load": {"workers": [worker(1, 283.5, 174.4)], "frontend_jvm": {"pid": 9, "rss_mib": 241.4}},
           "throughput": {"ok_per_s": 243.0, "ok_per_s_median": 240.0, "hey_seconds": 5.0, "concurrency": 16, "rounds": 2,
                          "ok_per_s_rounds": [240.0, 246.0], "p50_ms": 60.0, "p99_ms": 150.0, "error_count": 0}}
    text = memory.table({"runs": [run, {**run, "label": "idle", "throughput": None, "memory_after_load": None}]})
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("cpuvenv ")]
    assert len(rows) == 4  # 2 workers, the JVM, the sum
    assert "282.4" in rows[0] and "173.3" in rows[0] and "283.5" in rows[0] and "174.4" in rows[0]
    assert rows[1].split()[-1] == "-"  # worker 2 missing from the second sample
    assert "frontend JVM" in rows[2] and "201.3" in rows[2] and "241.4" in rows[2]
    assert "564.7" in rows[3] and "346.5" in rows[3]
    assert any("243.0 req/s" in line and "Ankle boot 0.963546" in line for line in lines)
    assert any(line.startswith("idle: no throughput run") for line in lines)
