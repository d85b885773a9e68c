"""Gradual rollout across every replica: a version staged beside the live one, then shadow, canary, promote, rollback.

The supervisor (scripts/deploy/supervisor.py) owns this state and serves it on its socket; the gateway's management
port routes ``/rollout/<model>`` there (management key), which is what ``python -m scripts.deploy.rollout --stage``
and ``ctl shadow / canary / promote / rollback`` call. The state lives in ``<run>/rollout.json`` (the recorder reads
it for the comparison's metrics) and is applied the same way to every replica:

- **stage** (``POST /rollout/<model>/stage {"version", "archive"}``): with TorchServe's model API off (shipped), a
  version can only be loaded at start, so each replica in turn is *replaced*: a successor TorchServe starts beside
  it with the archive added to ``load_models`` (the live version stays the default), and once it answers and the
  new version has a READY worker, the replica's hop is pointed at it and reloaded (the gateway retries what a
  reload interrupts); the old TorchServe is stopped once its queue is empty. The gateway itself is never reloaded.
- **shadow** / **canary** (``PUT /rollout/<model> {"action": "shadow" | "canary", "version", "percent"}``): every
  replica's hop is re-rendered (scripts/deploy/gateway.py: ``TrafficSplit``) and reloaded, and the call returns
  once every hop runs the new configuration.
- **promote**: ``set-default`` of the candidate on every replica (all checked first), then the split is removed;
  later restarts load the promoted archive first. **rollback**: a shadow or canary is removed; after a promote,
  the previous version becomes the default again on every replica.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scripts.deploy.gateway import TrafficSplit, write_private
from scripts.deploy.harness import ARCHIVE_NAME, REPO
from scripts.deploy.replicas import Replica
from scripts.ops.tsclient import read_properties

log = logging.getLogger("supervisor")
STATE_FILE = "rollout.json"
VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MODES = ("off", "shadow", "canary")
DRAIN_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 2.0


# --- errors: each an HTTP status and a message that says what to do ---------------------------------------------
class RolloutError(Exception):
    status = 400
    kind = "BadRolloutRequest"

    def to_body(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": str(self)}


class BadRolloutRequest(RolloutError):
    pass


class UnknownVersion(RolloutError):
    status, kind = 404, "UnknownVersion"


class RolloutConflict(RolloutError):
    status, kind = 409, "RolloutConflict"


class VersionNotReady(RolloutError):
    status, kind = 409, "VersionNotReady"


@dataclass
class RolloutState:
    model: str
    live: str  # the version /predictions/<model> answers from (the default on every replica)
    candidate: str | None = None
    mode: str = "off"  # off | shadow | canary
    percent: float = 0.0  # canary: the candidate's share of the default predictions; shadow: the share mirrored
    previous: str | None = None  # the version live before the last promote (rollback returns to it)
    staged: dict[str, str] = field(default_factory=dict)  # version -> archive added to load_models by a stage
    staging: dict | None = None  # the stage in progress or the last one: version, archive, replicas done, error
    changed_at: float = field(default_factory=time.time)

    def split(self) -> TrafficSplit | None:
        if self.mode == "off" or not self.candidate:
            return None
        return TrafficSplit(self.model, self.candidate, self.mode, self.percent)

    def to_json(self) -> dict:
        return asdict(self)


def base_load_models(stack) -> list[str]:
    """The archives every replica loads at start (--mar's, else the shipped config.properties' load_models)."""
    names = stack.opts.replica_overrides.get("load_models") or read_properties(REPO / "config.properties").get(
        "load_models", "")
    return [n.strip() for n in names.split(",") if n.strip()]


def parse_percent(value) -> float:
    try:
        percent = float(value)
    except (TypeError, ValueError):
        raise BadRolloutRequest(f'"percent" must be a number above 0 and below 100; got {value!r}.') from None
    if not 0 < percent < 100 or round(percent, 2) != percent:
        raise BadRolloutRequest(f'"percent" must be above 0 and below 100, with at most 2 decimals (nginx split_clients); '
                                f"got {value!r}. 100 % is a promote: ctl promote <model> <version>.")
    return percent


class Rollouts:
    """The rollout state of the stack's model and the operations on it (one at a time)."""

    def __init__(self, stack):
        self.stack = stack  # the supervisor's Stack (scripts/deploy/supervisor.py), which holds this
        self.path = stack.opts.run_dir / STATE_FILE
        self.lock = threading.Lock()  # one operation at a time
        self.state: RolloutState | None = None
        self.successors: set[Replica] = set()  # replicas starting beside the ones they replace (stopped by a stop)

    # --- state ------------------------------------------------------------------------------------
    def start(self) -> None:
        """At the stack's start: nothing staged, no split; the live version is what replica 0 serves by default."""
        live = self.stack.replicas[0].client.default_version(self.stack.opts.model)
        self.state = RolloutState(self.stack.opts.model, live)
        self.save()

    def save(self) -> None:
        self.state.changed_at = time.time()
        tmp = self.path.with_name(STATE_FILE + ".new")
        write_private(tmp, json.dumps(self.state.to_json(), indent=2))
        os.replace(tmp, self.path)

    def split(self) -> TrafficSplit | None:
        return self.state.split() if self.state is not None else None

    def check_model(self, model: str) -> RolloutState:
        if self.state is None or model != self.state.model:
            raise UnknownVersion(f"This stack serves {self.stack.opts.model!r}; no rollout of {model!r} can be made here.")
        return self.state

    def describe(self, model: str) -> dict:
        state = self.check_model(model)
        versions = {}
        for r in self.stack.replicas:
            versions[str(r.index)] = self.stack.models.get(r.index, {}).get(model, {})
        return {**state.to_json(), "replicas": versions}

    # --- checks -----------------------------------------------------------------------------------
    def versions_ready(self, model: str, version: str) -> list[str]:
        """What stops ``version`` from answering on each replica now (empty: READY everywhere)."""
        problems = []
        for r in self.stack.replicas:
            try:
                described = {d["modelVersion"]: d for d in self.stack.probe_client(r).describe(model)}
            except Exception as exc:
                problems.append(f"replica {r.index} did not answer ({type(exc).__name__})")
                continue
            if version not in described:
                problems.append(f"replica {r.index} has no version {version} (loaded: {', '.join(sorted(described))})")
            elif not any(w.get("status") == "READY" for w in described[version].get("workers", [])):
                problems.append(f"replica {r.index} has no READY worker of {version}")
        return problems

    def need_ready(self, model: str, version: str) -> None:
        problems = self.versions_ready(model, version)
        if problems and all("has no version" in p for p in problems):
            raise UnknownVersion(f"{model} {version} is not loaded: {'; '.join(problems)}. Stage it first: "
                                 f"make rollout VERSION={version} ROLLOUT_ARGS=--stage.")
        if problems:
            raise VersionNotReady(f"{model} {version} cannot take traffic: {'; '.join(problems)}. Stage it again, or "
                                  f"scale it: ctl scale {model} --version {version} --workers N.")

    # --- operations ------------------------------------------------------------------------------
    def act(self, model: str, doc: dict) -> dict:
        if not isinstance(doc, dict):
            raise BadRolloutRequest('Send {"action": "shadow" | "canary" | "promote" | "rollback", "version": "<v>", '
                                    '"percent": <share, canary only>}.')
        action, version = doc.get("action"), doc.get("version")
        if action not in ("shadow", "canary", "promote", "rollback"):
            raise BadRolloutRequest(f'"action" must be shadow, canary, promote or rollback; got {action!r}.')
        if action != "rollback" and (not isinstance(version, str) or not VERSION.match(version)):
            raise BadRolloutRequest(f'"version" must be a version name ([A-Za-z0-9._-], 1 to 64 characters); got {version!r}.')
        if not self.lock.acquire(timeout=5):
            raise RolloutConflict("Another rollout operation (a stage?) is in progress: GET /rollout/<model> shows it; "
                                  "retry when it has finished.")
        try:
            state = self.check_model(model)
            if action in ("shadow", "canary"):
                if version == state.live:
                    raise RolloutConflict(f"{model} {version} is already the live version; name a candidate.")
                if action == "canary":
                    percent = parse_percent(doc.get("percent"))
                else:  # the share of the default predictions mirrored (all by default)
                    percent = 100.0 if doc.get("percent") in (None, 100, 100.0) else parse_percent(doc.get("percent"))
                self.need_ready(model, version)
                state.candidate, state.mode, state.percent = version, action, percent
                self.apply(f"{action} of {model} {version} at {percent:g} %")
            elif action == "promote":
                self.promote(state, version)
            else:
                self.rollback(state)
            return self.describe(model)
        finally:
            self.lock.release()

    def apply(self, why: str) -> None:
        self.save()
        self.stack.sync_hops(why, wait=True)
        log.info("rollout: %s", why)

    def set_default(self, model: str, version: str) -> None:
        """The default on every replica (each was checked first); a replica that refuses leaves the others as they were."""
        done = []
        try:
            for r in self.stack.replicas:
                self.stack.probe_client(r).set_default(model, version)
                done.append(r)
        except Exception:
            for r in done:
                self.stack.probe_client(r).set_default(model, self.state.live)
            raise

    def promote(self, state: RolloutState, version: str) -> None:
        if version == state.live and state.mode == "off":
            raise RolloutConflict(f"{state.model} {version} is already the live version.")
        self.need_ready(state.model, version)
        self.set_default(state.model, version)  # first: a canary's share and the rest all reach it from here on
        self.pin_default(state.model, version)
        state.previous, state.live = state.live, version
        state.candidate, state.mode, state.percent = None, "off", 0.0
        self.apply(f"promote of {state.model} {version} (previous {state.previous})")

    def rollback(self, state: RolloutState) -> None:
        if state.mode != "off":
            was = f"{state.mode} of {state.candidate}"
            state.candidate, state.mode, state.percent = None, "off", 0.0
            self.apply(f"rollback of the {was}: every prediction from {state.live}")
            return
        if state.previous is None:
            raise RolloutConflict(f"Nothing to roll back: {state.model} {state.live} serves everything and no promote "
                                  "was made by this stack.")
        self.need_ready(state.model, state.previous)
        self.set_default(state.model, state.previous)
        self.pin_default(state.model, state.previous)
        state.live, state.previous = state.previous, None
        self.apply(f"rollback to {state.live}")

    # --- staging: load a version beside the live one on every replica ------------------------------------
    def stage(self, model: str, doc: dict) -> dict:
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), str) or not VERSION.match(doc["version"]):
            raise BadRolloutRequest('Send {"version": "<v>", "archive": "<name>.mar"} (the archive in the model store).')
        version, archive = doc["version"], doc.get("archive")
        if not isinstance(archive, str) or not re.fullmatch(ARCHIVE_NAME, archive) or ".." in archive:
            raise BadRolloutRequest(f'"archive" must be the file name of an archive in the model store; got {archive!r}.')
        if not (self.stack.opts.model_store / archive).is_file():
            raise UnknownVersion(f"{archive} is not in the model store {self.stack.opts.model_store}: package it there "
                                 "first (python -m scripts.deploy.rollout --stage does).")
        if not self.lock.acquire(blocking=False):
            raise RolloutConflict("Another rollout operation is in progress (GET /rollout/<model> shows it); retry when it "
                                  "has finished.")
        try:
            state = self.check_model(model)
            if archive in base_load_models(self.stack) or state.staged.get(version) == archive:
                if not self.versions_ready(model, version):  # loaded and READY everywhere already: nothing to do
                    state.staging = {"version": version, "archive": archive, "done": [r.index for r in self.stack.replicas],
                                     "error": None, "finished": True}
                    self.save()
                    self.lock.release()
                    return self.describe(model)
            if version == state.live:
                raise RolloutConflict(f"{model} {version} is the live version; stage a new version number.")
            state.staging = {"version": version, "archive": archive, "done": [], "error": None, "finished": False}
            self.save()
        except BaseException:
            self.lock.release()
            raise
        threading.Thread(target=self._stage, args=(model, version, archive), name="stage", daemon=True).start()
        return self.describe(model)

    def _stage(self, model: str, version: str, archive: str) -> None:
        state = self.state
        try:
            for replica in list(self.stack.replicas):
                if self.stack.stopping.is_set():
                    raise RuntimeError("the stack is stopping")
                self._replace(replica, model, version, archive)
                state.staging["done"].append(replica.index)
                self.save()
            state.staged[version] = archive
            log.info("rollout: %s %s staged on every replica (%s)", model, version, archive)
        except Exception as exc:
            log.exception("rollout: staging %s %s failed", model, version)
            state.staging["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            state.staging["finished"] = True
            self.save()
            self.lock.release()

    def load_models(self, replica: Replica, archive: str) -> str:
        """load_models for a successor: what the replica loads now (the default's archive first), and this one."""
        names = replica.overrides.get("load_models") or ",".join(base_load_models(self.stack))
        return ",".join(dict.fromkeys([*(n for n in names.split(",") if n), archive]))

    def pin_default(self, model: str, version: str) -> None:
        """A replica restarted later (TorchServe forgets set-default: --ncs) makes ``version`` the default again:
        its archive is listed first in that replica's load_models."""
        for r in self.stack.replicas:
            try:
                url = self.stack.probe_client(r).describe(model, version)[0]["modelUrl"]
            except Exception as exc:
                log.warning("rollout: replica %d: %s %s not pinned as default for restarts: %s", r.index, model, version, exc)
                continue
            name = Path(str(url).removeprefix("file://")).name
            names = [n for n in (r.overrides.get("load_models") or ",".join(base_load_models(self.stack))).split(",") if n]
            r.overrides = {**r.overrides, "load_models": ",".join(dict.fromkeys([name, *names]))}

    def _replace(self, old: Replica, model: str, version: str, archive: str) -> None:
        stack = self.stack
        overrides = {**old.overrides, "load_models": self.load_models(old, archive)}
        new = Replica(old.index, stack.opts.run_dir, stack.opts.model_store, overrides, old.env, old.generation + 1)
        self.successors.add(new)
        try:
            log.info("rollout: replica %d: starting a successor with %s beside it", old.index, archive)
            new.launch()
            new.wait_ready(model, stack.opts.ready_timeout_s, stack.stopping.is_set)
            new.client.set_default(model, self.state.live)  # what a restart's load_models order may not say
            deadline = time.monotonic() + stack.opts.ready_timeout_s
            while True:
                described = {d["modelVersion"]: d for d in new.client.describe(model)}
                if version not in described:
                    raise UnknownVersion(f"{archive} did not load as {model} {version} (loaded: {', '.join(described)}); "
                                         "package it with that version (rollout --stage --version does).")
                if any(w.get("status") == "READY" for w in described[version].get("workers", [])):
                    break
                if time.monotonic() > deadline or not new.alive():
                    raise VersionNotReady(f"{model} {version} has no READY worker on replica {old.index}'s successor; "
                                          f"see {new.workdir / 'logs' / 'model_log.log'}")
                time.sleep(0.5)
        except BaseException:
            new.stop()
            self.successors.discard(new)
            raise
        with old.lock:  # the supervisor restarts a dead replica under the same lock
            position = stack.replicas.index(old)
            stack.replicas[position] = new
            stack.retire_probe_client(old.index)
        self.successors.discard(new)
        stack.sync_hops(f"replica {old.index} now runs {new.workdir.name} ({archive} beside)", wait=True)
        stack.refresh_models(new)
        stack.publish()
        self._drain(old, model)
        old.stop()
        log.info("rollout: replica %d: %s stopped; %s serves", old.index, old.workdir.name, new.workdir.name)

    @staticmethod
    def _drain(old: Replica, model: str) -> None:
        """Wait until the replaced TorchServe has no queued request (the hop sends it nothing new)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if not any(d.get("jobQueueStatus", {}).get("pendingRequests") for d in old.client.describe(model)):
                    break
            except Exception:
                break
            time.sleep(0.2)
        time.sleep(DRAIN_GRACE_S)  # a batch a worker has taken is no longer "pending"

    def stop(self) -> None:
        for r in list(self.successors):
            r.stop()


def state_file(run_dir: Path) -> Path:
    return run_dir / STATE_FILE
