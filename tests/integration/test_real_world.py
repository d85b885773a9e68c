"""Photos and non-garments through the real TorchServe: canonicalised, flagged, counted, and a
tampered archive never reaches READY."""

from __future__ import annotations

import shutil

import pytest

from scripts.deploy.harness import make_server
from scripts.evaluate import real_world
from scripts.ops import drift
from scripts.train.data import REPO


def test_the_real_world_evaluation_runs_through_http_and_flags_non_garments(server, tmp_path):
    args = real_world.get_args_parser().parse_args([
        "--config", str(server.config), "--limit", "40", "--per-set", "12", "--scenes", "4", "--json", str(tmp_path / "r.json"),
        "--markdown", str(tmp_path / "r.md"), "--grid", str(tmp_path / "grid.png"),
    ])
    results = real_world.main(args)
    rows = results["sets"]
    assert rows["native"]["accuracy"] >= 0.8 and rows["catalogue_white"]["accuracy"] >= 0.7
    for name in ("digits", "photos", "faces", "text", "noise", "shapes", "mnist_digits"):
        assert rows[name]["flagged_ood"] >= 0.75, (name, rows[name])
    assert {f"scene_{k}" for k in ("flat_lay", "clutter", "hanger", "coloured", "light_on_light", "shadow", "edge")} <= set(rows)
    assert all(rows[f"scene_{k}"]["n"] == 4 for k in ("flat_lay", "plain"))
    assert rows["native"]["flagged_ood"] <= 0.1
    assert (tmp_path / "grid.png").stat().st_size > 10_000 and "| native |" in (tmp_path / "r.md").read_text()
    # Every out-of-distribution answer was counted on the metrics endpoint.
    snap = drift.Snapshot.from_text(server.client.metrics_text(), "fashion_cnn")
    flagged = sum(round(row["flagged_ood"] * row["n"]) for row in rows.values())
    assert snap.ood >= flagged


def test_a_tampered_archive_never_reaches_ready(tmp_path):
    """A handler whose canonicalisation resamples differently (as a library upgrade might) answers the
    golden photo differently: every worker refuses to start and the model never serves."""
    handler = tmp_path / "handler"
    shutil.copytree(REPO / "handler", handler, ignore=shutil.ignore_patterns("__pycache__"))
    source = (handler / "canonical.py").read_text()
    assert "Image.LANCZOS" in source
    (handler / "canonical.py").write_text(source.replace("Image.LANCZOS", "Image.NEAREST"))
    srv = make_server(tmp_path / "ts", archives=[{"handler_dir": handler}])
    try:
        with pytest.raises(Exception):  # noqa: B017 - wait_ready's own error: no READY worker before the deadline
            srv.start(deadline_s=60)  # stops the server itself when it raises
    finally:
        srv.stop()  # also when the tampered model did serve (the test then fails): leave nothing running
    log = (srv.workdir / "logs" / "model_log.log").read_text(errors="replace")
    assert "golden inputs answered differently than at export, refusing to serve" in log
    assert "catalogue_photo" in log
