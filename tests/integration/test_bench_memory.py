"""scripts.bench.memory against a real TorchServe: the workers run the chosen venv's Python and are measured.

The project venv always; a second serving venv (e.g. the CPU-only torch one, docs: scripts/bench/memory.py)
too when ``SERVING_VENV`` names it. No throughput run (--hey-seconds 0): ~15 s per venv.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil

from scripts.bench import memory
from scripts.deploy.harness import build_store


def test_memory_of_each_venvs_workers(tmp_path):
    venvs = [sys.prefix] + ([os.environ["SERVING_VENV"]] if os.environ.get("SERVING_VENV") else [])
    store = build_store(tmp_path / "store")
    out = tmp_path / "memory.json"
    args = memory.get_args_parser().parse_args(
        ["--venv", *venvs, "--mar", str(store / "fashion_cnn.mar"), "--requests", "3", "--hey-seconds", "0",
         "--workdir", str(tmp_path / "servers"), "--out", str(out)])
    result = memory.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["venv"] for r in result["runs"]] == [os.path.abspath(v) for v in venvs]
    for run in result["runs"]:
        workers = run["memory"]["workers"]
        assert len(workers) == 2  # the shipped model-config: minWorkers = maxWorkers = 2
        assert run["workers_use_venv"], [w["exe"] for w in workers]
        for w in workers:
            assert w["exe"].startswith(run["venv"] + "/bin/python")
            assert w["libtorch"].startswith(run["venv"] + "/lib/")
            assert 0 < w["uss_mib"] <= w["pss_mib"] <= w["rss_mib"]
            assert not psutil.pid_exists(w["pid"]) or psutil.Process(w["pid"]).status() == psutil.STATUS_ZOMBIE
        if run["cuda_build"] is None:
            assert all(w["nvidia_libs_mapped"] == 0 for w in workers)
        assert run["memory"]["frontend_jvm"]["rss_mib"] > 0
        assert run["predictions"]["fashion_cnn"] == {"status": {200: 3}, "label": "Ankle boot",
                                                     "confidence": run["predictions"]["fashion_cnn"]["confidence"]}
        assert not (Path(args.workdir) / run["label"] / "tmp" / ".model_server.pid").exists()
