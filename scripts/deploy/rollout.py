"""Roll out a new model version without dropping requests: package, load beside, check, switch, retire.

    python -m scripts.deploy.rollout --version 2.0                               # models/fashion_cnn.pt as 2.0
    python -m scripts.deploy.rollout --version 2.0 --model-file new.pt --retire unregister
    python -m scripts.deploy.rollout --version 2.0 --model-config v2-config.yaml  # another serving policy
    python -m scripts.deploy.rollout --version 2.0 --stage   # load beside the live version on every replica, no switch

``--stage`` (``make rollout VERSION=2.0 ROLLOUT_ARGS="--stage"``) stops after step 3: the version is loaded beside
the default, which keeps answering everything; then ``ctl shadow``, ``ctl canary``, ``ctl compare``, ``ctl promote``
or ``ctl rollback`` (docs/operations.md, "Gradual rollout"). Against the serving stack (``make serve``) it works with
the shipped configuration (model API off): the supervisor replaces each replica in turn by one that also loads the
new archive (scripts/deploy/traffic.py), losing no request; against a TorchServe reached directly it needs the
model API, as step 2 does.

Steps (docs/operations.md explains them and the choices):
1. package the TorchScript file as ``<name>_v<version>.mar`` in the model store (built in a
   temporary folder and moved in, so no archive in the store is ever half-written or replaced);
2. load it beside the serving version: POST /models (needs ``enable_model_api=true``). When
   the version is already loaded (its archive was listed in ``load_models`` at start, the
   way that works with the model API off) nothing is packaged or registered;
3. canary: the new version, called by its explicit URL, must classify the example image
   and name itself in X-Model-Version; otherwise the rollout stops (and unloads what it loaded)
   with the old version still the default;
4. switch: PUT /models/<name>/<version>/set-default, then check that /predictions/<name> answers
   from the new version;
5. retire the old version: ``keep`` (default: rollback is one set-default away), ``scale-down``
   (0 workers, still loaded) or ``unregister`` (DELETE, model API on); both wait until the old
   version's queue has drained first.

Requests keep flowing throughout: TorchServe routes each request to the version that is the
default when it arrives, and the old version keeps its workers until its queue is empty.
Exit code 0 on success, 1 when a check refused the rollout, 2 on an API error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scripts.deploy import package as packager
from scripts.ops import ctl
from scripts.ops.tsclient import REPO, ApiError, TorchServeClient, model_store

EXAMPLE = REPO / "examples" / "ankle_boot.png"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.deploy.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", required=True, help="the new version number, e.g. 2.0")
    p.add_argument("--name", default=ctl.MODEL, help="model name")
    p.add_argument("--model-file", type=Path, default=REPO / "models" / "fashion_cnn.pt", help="TorchScript .pt to package")
    p.add_argument("--model-config", type=Path, default=packager.HANDLER_DIR / "model-config.yaml",
                   help="model-config.yaml packaged with it (workers, batching, handler overrides)")
    p.add_argument("--workers", type=int, default=None, help="workers for the new version (default: as the old one)")
    p.add_argument("--retire", choices=("keep", "scale-down", "unregister"), default="keep",
                   help="what to do with the old version after the switch")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="max seconds to wait for the old queue to empty")
    p.add_argument("--grace", type=float, default=2.0, help="seconds to wait after the old queue is empty")
    p.add_argument("--example", type=Path, default=EXAMPLE, help="image for the canary request")
    p.add_argument("--stage", action="store_true",
                   help="load the version beside the default on every replica and stop there (no switch)")
    p.add_argument("--stage-timeout", type=float, default=900.0, help="seconds to wait for the stage (every replica)")
    ctl.add_connection_args(p)
    return p


def package_into_store(args, store: Path) -> str:
    """Build <name>_v<version>.mar in a temporary folder, then move it into the store; returns its file name."""
    archive = f"{args.name}_v{args.version}"
    with tempfile.TemporaryDirectory(prefix="rollout-") as tmp:
        pargs = packager.get_args_parser().parse_args([])
        pargs.model, pargs.name, pargs.version = args.model_file, args.name, args.version
        pargs.config, pargs.export_path, pargs.archive_name = args.model_config, Path(tmp), archive
        built = packager.main(pargs)
        target = store / built.name
        shutil.move(str(built), str(target))
    print(f"packaged {args.model_file} as {args.name} {args.version}: {target}")
    return target.name


def model_api_off(args) -> ctl.Refused:
    archive = f"{args.name}_v{args.version}.mar"
    return ctl.Refused(
        f"{args.name} {args.version} is not loaded and this TorchServe cannot load a model while it runs "
        "(enable_model_api=false: POST /models answers 405). Either package it "
        f"(python -m scripts.deploy.package --version {args.version} --archive-name {archive[:-4]}), list {archive} in "
        "load_models next to the current archive, restart, and rerun this to switch; or run TorchServe with "
        "enable_model_api=true (docs/operations.md explains the trade-off)."
    )


def load_beside(client: TorchServeClient, args, url: str, workers: int) -> None:
    try:
        print(client.register(url, workers).get("status"))
    except ApiError as exc:
        if exc.status == 405:
            raise model_api_off(args) from exc
        raise


def canary(client: TorchServeClient, args) -> dict:
    resp = client.predict(args.name, args.example.read_bytes(), version=args.version, check=False)
    served = resp.headers.get("X-Model-Version")
    if resp.status_code != 200 or served != args.version or "label" not in resp.json():
        raise ctl.Refused(f"canary on {args.name} {args.version} failed: HTTP {resp.status_code}, "
                          f"X-Model-Version {served!r}, body {resp.text[:200]}")
    return resp.json()


def drain(client: TorchServeClient, name: str, version: str, timeout: float, grace: float) -> None:
    """Wait until ``version`` has no queued request (it is no longer the default, so none arrive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not client.describe(name, version)[0].get("jobQueueStatus", {}).get("pendingRequests"):
            break
        time.sleep(0.2)
    time.sleep(grace)  # a batch already taken by a worker is no longer "pending"


def stack_rollout(client: TorchServeClient, name: str) -> dict | None:
    """The serving stack's rollout state (GET /rollout/<model>), or None for a TorchServe reached directly."""
    try:
        return ctl.rollout_call(client, "GET", name)
    except ctl.Refused as exc:
        if "need the serving stack" in str(exc):
            return None
        raise


def stage(args) -> int:
    """Load the version beside the default on every replica without switching anything."""
    client = ctl.connect(args)
    state = stack_rollout(client, args.name)
    if state is None:  # a TorchServe reached directly: its model API loads it beside
        versions = ctl.model_state(client, args.name)
        if not any(v["version"] == args.version for v in versions):
            if not client.model_api_enabled():
                raise model_api_off(args)
            old = next(v for v in versions if v["default"])
            url = package_into_store(args, model_store(args.config, args.workdir))
            load_beside(client, args, url, args.workers or old["min_workers"] or 1)
    elif state["live"] == args.version:
        raise ctl.Refused(f"{args.name} {args.version} is already the live version")
    elif state["replicas"] and all(versions.get(args.version) for versions in state["replicas"].values()):
        print(f"{args.name} {args.version} is already loaded with a READY worker on every replica: nothing to stage")
    else:
        url = package_into_store(args, model_store(args.config, args.workdir))
        resp = client.request("management", "POST", f"/rollout/{args.name}/stage",
                              json={"version": args.version, "archive": url}, check=False)
        if resp.status_code != 202:
            raise ctl.Refused(resp.json().get("message", resp.text[:300]) if resp.headers.get("Content-Type", "").startswith(
                "application/json") else resp.text[:300])
        print(f"staging {args.name} {args.version} on every replica (each replaced in turn, no request lost) ...", flush=True)
        deadline, shown = time.monotonic() + args.stage_timeout, -1
        while True:
            staging = ctl.rollout_call(client, "GET", args.name).get("staging") or {}
            if len(staging.get("done", [])) != shown:
                shown = len(staging.get("done", []))
                print(f"  replicas done: {staging.get('done')}", flush=True)
            if staging.get("finished"):
                break
            if time.monotonic() > deadline:
                raise ctl.Refused(f"the stage did not finish within {args.stage_timeout:g} s; GET /rollout/{args.name} "
                                  "and logs/supervisor.log show where it is")
            time.sleep(1.0)
        if staging.get("error"):
            raise ctl.Refused(f"staging {args.name} {args.version} failed: {staging['error']} (logs/supervisor.log); the "
                              "live version serves as before")
    answer = canary(client, args)
    print(f"{args.name} {args.version} answers on its own URL: {args.example.name} -> {answer['label']} "
          f"{answer['confidence']:.3f}; the default is unchanged ({client.default_version(args.name)})")
    print(f"next: python -m scripts.ops.ctl shadow {args.name} {args.version}, then ctl compare {args.name} {args.version}, "
          f"ctl canary {args.name} {args.version} --percent 5, ctl promote {args.name} {args.version} (or ctl rollback "
          f"{args.name})")
    return 0


def rollout(args) -> int:
    if args.stage:
        return stage(args)
    client = ctl.connect(args)
    versions = ctl.model_state(client, args.name)
    old = next(v for v in versions if v["default"])
    if old["version"] == args.version:
        raise ctl.Refused(f"{args.name} {args.version} is already the default version")
    new = next((v for v in versions if v["version"] == args.version), None)
    workers = args.workers or old["min_workers"] or 1
    registered_here = False
    if new is None:
        if not client.model_api_enabled():
            raise model_api_off(args)  # before packaging anything
        store = model_store(args.config, args.workdir)
        url = package_into_store(args, store)
        load_beside(client, args, url, workers)
        registered_here = True
    else:
        print(f"{args.name} {args.version} is already loaded ({new['archive']}): switching only")
        if ctl.ready(new) == 0:
            client.scale(args.name, workers, version=args.version)

    try:
        answer = canary(client, args)
    except ctl.Refused:
        if registered_here:
            client.unregister(args.name, args.version)
            print(f"unloaded {args.name} {args.version}; {old['version']} stays the default")
        raise
    print(f"canary: {args.example.name} -> {answer['label']} {answer['confidence']:.3f} from {args.name} {args.version}")

    print(client.set_default(args.name, args.version).get("status"))
    served = client.predict(args.name, args.example.read_bytes()).headers.get("X-Model-Version")
    if served != args.version:
        raise ctl.Refused(f"after set-default /predictions/{args.name} still answers from {served}")
    print(f"/predictions/{args.name} now answers from {served}")

    if args.retire != "keep":
        drain(client, args.name, old["version"], args.drain_timeout, args.grace)
        if args.retire == "scale-down":
            print(client.scale(args.name, 0, version=old["version"]).get("status"))
        else:
            print(client.unregister(args.name, old["version"]).get("status"))
    else:
        print(f"{old['version']} stays loaded; roll back with: python -m scripts.ops.ctl set-default {args.name} {old['version']}")
    print(ctl.format_state(ctl.model_state(client, args.name)))
    return 0


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        args = get_args_parser().parse_args(args)
    return ctl.run(rollout, args)


if __name__ == "__main__":
    sys.exit(main())
