"""Zero-downtime version switches under continuous load, against a real TorchServe.

Three client threads send requests the whole time (bounded: they stop after the
switch, or after 240 s at most) and every answer's X-Model-Version is recorded
with when the request was sent. Two routes are checked:

- model API on (``enable_model_api=true``, this test's own server only): scripts.deploy.rollout
  packages v2 into the store, registers it beside v1, canaries, switches, unregisters v1;
- model API off (the shipped setting): both archives listed in load_models at start,
  rollout only switches; ctl set-default rolls back; a version that is not loaded is
  refused before anything is packaged.
"""

from __future__ import annotations

import time

import yaml

from scripts.deploy import rollout
from scripts.deploy.harness import REPO, make_server, make_two_version_server
from scripts.ops import ctl
from scripts.ops.tsclient import TorchServeClient
from tests.conftest import SHIPPED_VIEWS
from tests.integration import load

MODEL = "fashion_cnn"
BOOT = (REPO / "examples" / "ankle_boot.png").read_bytes()
V2_TTA = ["identity", "hflip", "shift(1,0)", "shift(-1,0)"]


class Load(load.Load):
    """``threads`` clients sending the example image straight to TorchServe, every view (``tta_views`` shows the
    policy that answered)."""

    def __init__(self, srv, threads: int = 3, limit_s: float = 240.0):
        super().__init__(threads, limit_s)
        self.srv = srv

    def connect(self):
        return TorchServeClient.from_config(self.srv.config, self.srv.workdir, timeout=60)

    def send(self, client):
        return client.predict(MODEL, BOOT, headers={"X-TTA": "all"}, check=False)


def connection(srv) -> list[str]:
    return ["--config", str(srv.config), "--workdir", str(srv.workdir)]


def loaded_versions(srv) -> dict[str, dict]:
    return {d["modelVersion"]: d for d in srv.client.describe(MODEL)}


def test_rollout_registers_switches_and_retires_without_a_failed_request(tmp_path_factory, tmp_path):
    srv = make_server(tmp_path_factory.mktemp("rollout_api"), overrides={"enable_model_api": "true"})
    srv.start()
    try:
        # v2: the same weights served with a 4-view TTA policy (a visibly different answer: tta_views)
        config = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
        config["handler"]["tta"] = V2_TTA
        v2_config = tmp_path / "v2-config.yaml"
        v2_config.write_text(yaml.safe_dump(config))
        v1_archive = (srv.model_store / "fashion_cnn.mar").read_bytes()

        with Load(srv) as load:
            time.sleep(3)
            started = time.monotonic()
            code = rollout.main(["--version", "2.0", "--model-config", str(v2_config), "--retire", "unregister",
                                 *connection(srv)])
            finished = time.monotonic()
            time.sleep(3)
        assert code == 0

        assert load.failures() == [], load.failures()[:5]
        before = load.between(0, started)
        after = load.between(finished, float("inf"))
        assert len(before) >= 10 and len(after) >= 10, (len(before), len(after))
        assert {(a.version, a.tta_views) for a in before} == {("1.0", SHIPPED_VIEWS)}
        assert {(a.version, a.tta_views) for a in after} == {("2.0", 4)}
        during = {a.version for a in load.between(started, finished)}
        assert during <= {"1.0", "2.0"} and len(load.answers) > len(before) + len(after)

        # v1 retired; the new archive sits in the store beside the untouched old one
        assert list(loaded_versions(srv)) == ["2.0"]
        assert (srv.model_store / "fashion_cnn_v2.0.mar").is_file()
        assert (srv.model_store / "fashion_cnn.mar").read_bytes() == v1_archive
    finally:
        srv.stop()


def test_switch_and_rollback_with_the_model_api_off(tmp_path_factory, capsys):
    srv = make_two_version_server(tmp_path_factory.mktemp("rollout_noapi"))
    srv.start()
    try:
        deadline = time.monotonic() + 180
        while not all(len(d["workers"]) == 2 and all(w["status"] == "READY" for w in d["workers"])
                      for d in loaded_versions(srv).values()):
            assert time.monotonic() < deadline, loaded_versions(srv)
            time.sleep(0.5)
        assert srv.client.model_api_enabled() is False

        with Load(srv) as load:
            time.sleep(2)
            t0 = time.monotonic()
            assert rollout.main(["--version", "2.0", *connection(srv)]) == 0  # already loaded: switch only
            t1 = time.monotonic()
            time.sleep(2)
            t2 = time.monotonic()
            assert ctl.main(["set-default", MODEL, "1.0", *connection(srv)]) == 0  # rollback
            t3 = time.monotonic()
            time.sleep(2)
        assert load.failures() == [], load.failures()[:5]
        windows = [load.between(0, t0), load.between(t1, t2), load.between(t3, float("inf"))]
        assert [{a.version for a in w} for w in windows] == [{"1.0"}, {"2.0"}, {"1.0"}]
        assert all(len(w) >= 5 for w in windows), [len(w) for w in windows]

        # not loaded + model API off: refused up front, nothing packaged, nothing changed
        capsys.readouterr()
        assert rollout.main(["--version", "3.0", *connection(srv)]) == 1
        err = capsys.readouterr().err
        assert "enable_model_api=false" in err and "load_models" in err
        assert not list(srv.model_store.glob("*3.0*"))
        assert set(loaded_versions(srv)) == {"1.0", "2.0"}
        assert srv.client.default_version(MODEL) == "1.0"
        assert rollout.main(["--version", "1.0", *connection(srv)]) == 1
        assert "already the default" in capsys.readouterr().err
    finally:
        srv.stop()
