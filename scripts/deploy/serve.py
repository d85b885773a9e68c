"""Start, stop and inspect the serving stack: the nginx gateway in front of N TorchServe replicas.

    python -m scripts.deploy.serve start [--replicas N]   # in the background; waits until a prediction answers
    python -m scripts.deploy.serve start --mar model_store/mynet.mar   # another archive (make archive), as model mynet
    python -m scripts.deploy.serve run   [--replicas N]   # in the foreground (the container's entry point)
    python -m scripts.deploy.serve status                 # every replica, its workers, and readiness
    python -m scripts.deploy.serve stop

Used by ``make serve [REPLICAS=N] [MAR=model_store/NAME.mar]``, ``make status`` and ``make stop``. With ``--mar``
the stack serves that archive instead of config.properties' ``load_models`` (the model's name is the archive's,
``NAME``), and the Prometheus rules, dashboard and scrape config are generated from *its* reference
(``scripts.ops.alerts``) into ``<run dir>/monitoring/`` (the shipped model's are deploy/monitoring/). The public
addresses are config.properties' (127.0.0.1:8080 inference, :8081 management, :8082
metrics, and 127.0.0.1:7070 for KServe's gRPC service, grpc_inference_address/port); the
replicas run on free loopback ports behind the gateway. Environment:
REPLICAS, GATEWAY_HOST (the host the public ports bind; 0.0.0.0 in the container),
SERVE_RUN_DIR, SERVE_LOG_DIR, KEY_FILE, GATEWAY_LARGE_BODIES, GATEWAY_PHOTO_BODIES, GATEWAY_ACCESS_LOG, and for recording and
feedback FEEDBACK_RECORD, FEEDBACK_STORE, FEEDBACK_KEEP_UPLOADS, FEEDBACK_REVIEW_SHARE, FEEDBACK_RETENTION_DAYS,
FEEDBACK_RETENTION_MB, FEEDBACK_SPOOL_MB. Starting twice is safe: when the service already answers, ``start`` only
prints how to call it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
import requests

from scripts.deploy.supervisor import Stack, StackOptions
from scripts.ops.tsclient import REPO, ApiError, Endpoints, TorchServeClient, read_properties

EXAMPLE = REPO / "examples" / "ankle_boot.png"


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "run", "stop", "status"))
    p.add_argument("--replicas", type=int, default=int(env("REPLICAS", "1")), help="TorchServe replicas (env REPLICAS)")
    p.add_argument("--config", type=Path, default=REPO / "config.properties",
                   help="public addresses, model store and body limit come from here")
    p.add_argument("--host", default=env("GATEWAY_HOST"),
                   help="bind the public ports on this host instead of the config's (env GATEWAY_HOST)")
    p.add_argument("--ports", default=env("GATEWAY_PORTS"),
                   help="inference,management,metrics[,grpc] ports instead of the config's (env GATEWAY_PORTS); "
                        "without a fourth, gRPC keeps the config's port")
    p.add_argument("--run-dir", type=Path, default=Path(env("SERVE_RUN_DIR", REPO / "run")))
    p.add_argument("--log-dir", type=Path, default=Path(env("SERVE_LOG_DIR", REPO / "logs")))
    p.add_argument("--key-file", type=Path, default=Path(env("KEY_FILE", REPO / "key_file.json")),
                   help="the service credentials (created when missing; TorchServe's key-file format)")
    p.add_argument("--large-bodies", type=int, default=int(env("GATEWAY_LARGE_BODIES", "4")),
                   help="bodies of 4 MB or more (or chunked) in flight at once; more get 503 + Retry-After")
    p.add_argument("--photo-bodies", type=int, default=int(env("GATEWAY_PHOTO_BODIES", "16")),
                   help="bodies of 1 MB to 4 MB (phone photos) in flight at once; more get 503 + Retry-After")
    p.add_argument("--access-log", choices=("file", "stdout"), default=env("GATEWAY_ACCESS_LOG", "file"),
                   help="the gateway's JSON access log: logs/gateway_access.log (rotated) or stdout (env GATEWAY_ACCESS_LOG)")
    p.add_argument("--mar", type=Path, default=None,
                   help="serve this archive (e.g. model_store/mynet.mar, written by make archive) as its model name "
                        "instead of config.properties' load_models")
    p.add_argument("--model", default=None,
                   help="the model to probe and report (default: the --mar archive's, else the running stack's, "
                        "else fashion_cnn)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the first answer")
    # Recording and feedback (docs/operations.md, "Labelled feedback"): every answer recorded, /feedback served.
    p.add_argument("--no-record", dest="record", action="store_false", default=env("FEEDBACK_RECORD", "on") != "off",
                   help="record no answers and serve no /feedback (env FEEDBACK_RECORD=off)")
    p.add_argument("--store", default=env("FEEDBACK_STORE"),
                   help="the feedback store: a PostgreSQL DSN (postgresql://user:password@host/db, for several replicas "
                        "or hosts) or an SQLite file; default <run-dir>/feedback.sqlite3 (env FEEDBACK_STORE)")
    p.add_argument("--keep-uploads", action="store_true", default=env("FEEDBACK_KEEP_UPLOADS", "0") == "1",
                   help="keep the raw upload of the answers in the review sample (env FEEDBACK_KEEP_UPLOADS=1)")
    p.add_argument("--review-share", type=float, default=float(env("FEEDBACK_REVIEW_SHARE", "0.05")),
                   help="share of confident answers drawn at random into the review sample (env FEEDBACK_REVIEW_SHARE)")
    p.add_argument("--retention-days", type=float, default=float(env("FEEDBACK_RETENTION_DAYS", "30")),
                   help="unlabelled answers older than this are deleted; 0 keeps them (env FEEDBACK_RETENTION_DAYS)")
    p.add_argument("--retention-mb", type=float, default=float(env("FEEDBACK_RETENTION_MB", "1024")),
                   help="recorded inputs and uploads are kept under this size, oldest unlabelled deleted first; 0: no "
                        "limit (env FEEDBACK_RETENTION_MB)")
    p.add_argument("--spool-mb", type=float, default=float(env("FEEDBACK_SPOOL_MB", "256")),
                   help="per replica, answers waiting for the recorder; beyond, new answers are not recorded (counted "
                        "in RecordLost) (env FEEDBACK_SPOOL_MB)")
    return p


# --- addresses ---------------------------------------------------------------------------------------
def public_addresses(args) -> dict[str, str]:
    """host:port for inference / management / metrics / grpc: config.properties', or --host / --ports."""
    props = read_properties(args.config)
    ports = args.ports.split(",") if args.ports else []
    out = {}
    for i, (name, default) in enumerate((("inference", "8080"), ("management", "8081"), ("metrics", "8082"))):
        url = props.get(f"{name}_address", f"http://127.0.0.1:{default}")
        host, port = url.split("://", 1)[-1].rsplit(":", 1)
        out[name] = f"{args.host or host}:{ports[i] if len(ports) > i else port}"
    # KServe's gRPC service: where config.properties puts TorchServe's gRPC inference API (the replicas' own
    # gRPC ports are free loopback ones, like their REST ports).
    grpc_host = props.get("grpc_inference_address", "127.0.0.1")
    out["grpc"] = f"{args.host or grpc_host}:{ports[3] if len(ports) > 3 else props.get('grpc_inference_port', '7070')}"
    return out


def url(addr: str) -> str:
    host, port = addr.rsplit(":", 1)
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def public_client(args, timeout: float = 60.0) -> TorchServeClient:
    addr = public_addresses(args)
    return TorchServeClient(Endpoints(url(addr["inference"]), url(addr["management"]), url(addr["metrics"])),
                            args.key_file, timeout=timeout)


def busy(addresses: dict[str, str]) -> list[str]:
    taken = []
    for name, addr in addresses.items():
        host, port = addr.rsplit(":", 1)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, int(port)))
            except OSError:
                taken.append(f"{addr} ({name})")
    return taken


def archive_model_name(mar: Path) -> str:
    """The model name inside a .mar (MAR-INF/MANIFEST.json), which TorchServe serves it as."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise SystemExit(f"error: {mar} is not a model archive ({exc}); make one with "
                         "`make archive MODEL=path.pt DATA=dir/ NAME=mynet`") from None


def resolve_model(args) -> None:
    """``args.model`` from ``--mar`` (its manifest), else from the running stack, else fashion_cnn."""
    if args.mar is not None:
        if not args.mar.is_file():
            raise SystemExit(f"error: {args.mar} does not exist: make it with "
                             "`make archive MODEL=path.pt DATA=dir/ NAME=mynet` (it writes model_store/NAME.mar)")
        name = archive_model_name(args.mar)
        if args.model not in (None, name):
            raise SystemExit(f"error: {args.mar} serves model {name!r}, not {args.model!r}")
        args.model = name
    elif args.model is None:
        args.model = state(args).get("model") or "fashion_cnn"


def stack_options(args) -> StackOptions:
    props = read_properties(args.config)
    store = Path(props.get("model_store", "model_store"))
    store = (store if store.is_absolute() else args.config.parent / store).resolve()
    overrides = {}
    if args.mar is not None:  # that archive alone, from its own folder (the model store when it is there)
        store = args.mar.resolve().parent
        overrides["load_models"] = args.mar.name
    addr = public_addresses(args)
    return StackOptions(run_dir=args.run_dir.resolve(), log_dir=args.log_dir.resolve(), key_file=args.key_file.resolve(),
                        model_store=store, replica_overrides=overrides,
                        model=args.model, replicas=args.replicas, public_inference=addr["inference"],
                        public_management=addr["management"], public_metrics=addr["metrics"], public_grpc=addr["grpc"],
                        max_body=int(props.get("max_request_size", 10 * 2**20)), large_bodies=args.large_bodies,
                        photo_bodies=args.photo_bodies, access_log=args.access_log, ready_timeout_s=args.timeout, record=args.record, store=args.store,
                        keep_uploads=args.keep_uploads, review_share=args.review_share,
                        retention_days=args.retention_days, retention_mb=args.retention_mb, spool_mb=args.spool_mb)


def state(args) -> dict:
    try:
        return json.loads((args.run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def running_pid(args) -> int | None:
    pid = state(args).get("pid")
    try:
        proc = psutil.Process(pid) if pid else None
        # the pid must still be a `serve run` (after an unclean exit the number may belong to anything)
        if proc and proc.status() != psutil.STATUS_ZOMBIE and "scripts.deploy.serve" in " ".join(proc.cmdline()):
            return pid
    except psutil.Error:
        pass
    return None


# --- actions -----------------------------------------------------------------------------------------
def answers(client: TorchServeClient, model: str) -> dict | None:
    try:
        resp = client.predict(model, EXAMPLE.read_bytes(), check=False)
        return resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def how_to_call(args, answer: dict) -> str:
    client = public_client(args)
    ep, key_file = client.endpoints, args.key_file
    shown = key_file.relative_to(Path.cwd()) if key_file.is_relative_to(Path.cwd()) else key_file
    return f"""
Serving '{args.model}' through the gateway with {args.replicas} TorchServe replica(s)
  (example: {EXAMPLE.name} -> {answer['label']}, confidence {answer['confidence']:.3f}{', out of distribution' if answer.get('out_of_distribution') else ''})

  inference   {ep.inference}/predictions/{args.model}      readiness: {ep.inference}/ping
  management  {ep.management}/models/{args.model}          (management key; /replicas lists the replicas)
  metrics     {ep.metrics}/metrics                      (for the scraper; every replica, labelled)
  v2 / gRPC   {ep.inference}/v2/models/{args.model}/infer   grpc {url(public_addresses(args)['grpc'])[7:]} (KServe's Open Inference Protocol)
  feedback    {ep.inference}/feedback/{args.model}        (feedback key: labels for answers; /summary, /review)
  keys        {shown}  (service credentials; they do not expire)

Call it:
  TOKEN=$(python3 -c 'import json; print(json.load(open("{shown}"))["inference"]["key"])')
  curl -H "Authorization: Bearer $TOKEN" --data-binary @examples/coat.png {ep.inference}/predictions/{args.model}
  curl -H "Authorization: Bearer $TOKEN" -H "X-Top-K: 5" -F data=@examples/coat.png {ep.inference}/predictions/{args.model}

Or with the client:  .venv/bin/python -m scripts.ops.client examples/*.png
Status: make status     Stop: make stop
"""


def monitoring(args) -> Path | None:
    """Prometheus config, rules and dashboard for the --mar archive, from its own reference (scripts.ops.alerts)."""
    if args.mar is None:
        return None
    from scripts.ops import alerts

    out = args.run_dir / "monitoring"
    gen = alerts.get_args_parser().parse_args(["--model", str(args.mar), "--out", str(out), "--config", str(args.config),
                                               "--target", public_addresses(args)["metrics"].replace("0.0.0.0", "127.0.0.1")])
    for path, text in alerts.generate(gen).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return out


def start(args) -> int:
    client = public_client(args)
    running = running_pid(args)
    served = state(args).get("model")
    if running and served and served != args.model:
        print(f"error: the stack started from here serves {served!r}, not {args.model!r}: stop it first (make stop)",
              file=sys.stderr)
        return 1
    answer = answers(client, args.model) if running else None
    if answer:
        print(how_to_call(args, answer))
        return 0
    taken = busy(public_addresses(args))
    if taken:
        print(f"error: cannot start the gateway: {', '.join(taken)} already in use. Stop what holds it "
              f"(make stop, or torchserve --stop for a TorchServe started by hand), or change the port.", file=sys.stderr)
        return 1
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.log_dir / "serve.log"
    cmd = [sys.executable, "-m", "scripts.deploy.serve", "run", "--replicas", str(args.replicas),
           "--config", str(args.config), "--run-dir", str(args.run_dir), "--log-dir", str(args.log_dir),
           "--key-file", str(args.key_file), "--large-bodies", str(args.large_bodies),
           "--photo-bodies", str(args.photo_bodies), "--access-log", args.access_log, "--model", args.model,
           "--timeout", str(args.timeout), "--review-share", str(args.review_share),
           "--retention-days", str(args.retention_days), "--retention-mb", str(args.retention_mb),
           "--spool-mb", str(args.spool_mb)] + (["--host", args.host] if args.host else []) + \
          (["--ports", args.ports] if args.ports else []) + (["--mar", str(args.mar)] if args.mar else []) + \
          ([] if args.record else ["--no-record"]) + (["--keep-uploads"] if args.keep_uploads else [])
    rules = monitoring(args)
    if rules is not None:
        print(f"alerts for {args.model}: {rules} (Prometheus config, rules and dashboard from its reference)")
    print(f"starting the gateway and {args.replicas} TorchServe replica(s); log: {log_path}")
    env = {**os.environ, **({"FEEDBACK_STORE": args.store} if args.store else {})}  # a DSN's password stays out of `ps`
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + args.timeout * 1.5 + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            print(f"error: the serving stack exited with {proc.returncode}; last lines of {log_path}:\n{tail}", file=sys.stderr)
            return 1
        answer = answers(client, args.model) if args.key_file.exists() else None
        if answer:
            print(how_to_call(args, answer))
            return 0
        time.sleep(0.5)
    print(f"error: no prediction through the gateway within {args.timeout * 1.5 + 30:.0f} s; stopping what started. "
          f"See {log_path}", file=sys.stderr)
    os.killpg(proc.pid, signal.SIGTERM)  # serve run stops its replicas and gateway on SIGTERM
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    return 1


def missing_archives(args, opts: StackOptions) -> list[str]:
    """Archives config.properties' load_models names (or --mar) that the model store does not hold."""
    names = opts.replica_overrides.get("load_models") or read_properties(args.config).get("load_models", "")
    return [str(opts.model_store / n.strip()) for n in names.split(",")
            if n.strip() and n.strip() != "all" and not (opts.model_store / n.strip()).exists()]


def start_interruptibly(stack: Stack) -> None:
    """``stack.start()`` in a thread, so SIGTERM during a slow start is handled at once (the main thread
    would otherwise sit in an uninterruptible wait) and stops the start instead of waiting for it."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            stack.start()
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    starter = threading.Thread(target=target, name="start")
    starter.start()
    while starter.is_alive():
        starter.join(0.5)
    if failure:
        raise failure[0]


def run(args) -> int:
    opts = stack_options(args)
    missing = missing_archives(args, opts)
    if missing:
        print(f"error: {', '.join(missing)} missing: build it with `make mar` (make serve does)", file=sys.stderr)
        return 1
    stack = Stack(opts)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stack.request_stop(signal.Signals(signum).name))
    try:
        start_interruptibly(stack)
        stack.supervise()
        return 0
    except Exception as exc:
        if stack.stopping.is_set():  # a stop asked for during the start: not a failure
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def stop(args) -> int:
    pid = running_pid(args)
    if pid is None and not state(args):
        # No gateway stack here: stop a TorchServe started by hand from this folder, as before.
        result = subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], cwd=REPO,
                                capture_output=True, text=True)
        print((result.stdout + result.stderr).strip())
        return 0
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        try:
            psutil.Process(pid).wait(timeout=90)
        except psutil.TimeoutExpired:
            print(f"the serving stack (pid {pid}) did not stop within 90 s", file=sys.stderr)
            return 1
        except psutil.NoSuchProcess:
            pass
    leftover(args)
    (args.run_dir / "state.json").unlink(missing_ok=True)
    print("stopped")
    return 0


def leftover(args) -> None:
    """Whatever a killed ``run`` left behind: replicas (torchserve --stop in their TMPDIR) and the nginx masters."""
    st = state(args)
    for rep in st.get("replicas", []):
        tmp = Path(rep["workdir"]) / "tmp"
        if (tmp / ".model_server.pid").exists():
            env = {**os.environ, "TMPDIR": str(tmp)}
            subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], cwd=rep["workdir"], env=env,
                           capture_output=True, timeout=120)
    for pid in [st.get("gateway_pid"), *st.get("hop_pids", [])]:  # the gateway and the replicas' hops
        try:
            if pid and "nginx" in psutil.Process(pid).name():
                os.kill(pid, signal.SIGQUIT)
        except psutil.Error:
            pass
    for key, module in (("grpc_pid", "scripts.deploy.grpc_service"), ("recorder_pid", "scripts.deploy.recorder"),
                        ("shadow_pid", "scripts.deploy.shadow")):
        try:  # the gRPC service and the recorder, if they are still ours
            pid = st.get(key)
            if pid and module in " ".join(psutil.Process(pid).cmdline()):
                os.kill(pid, signal.SIGTERM)
        except psutil.Error:
            pass


def status(args) -> int:
    client = public_client(args, timeout=10)
    try:
        resp = requests.get(f"{client.endpoints.inference}/ping", timeout=10)
        ready = resp.json()
    except (requests.RequestException, ValueError) as exc:
        print(f"not serving: the gateway at {client.endpoints.inference} does not answer ({exc})")
        return 1
    print(f"readiness: {ready.get('status')} ({ready.get('ready_replicas')} of {len(ready.get('replicas', []))} "
          "replica(s) answered a prediction just now)")
    for rep in ready.get("replicas", []):
        line = f"  replica {rep['index']}: {'ready' if rep['ready'] else 'NOT READY'} ({rep['detail']}; restarts {rep['restarts']})"
        try:
            for entry in client.request("management", "GET", f"/replicas/{rep['index']}/models/{args.model}/all").json():
                workers = ", ".join(f"{w['id']}:{w['status']}" for w in entry["workers"]) or "none"
                line += f"\n    {entry['modelName']} v{entry['modelVersion']}: workers [{workers}]"
        except (ApiError, requests.RequestException, ValueError) as exc:
            line += f"\n    workers unknown: {exc}"
        print(line)
    return 0 if resp.status_code == 200 else 1


def main(args: argparse.Namespace) -> int:
    resolve_model(args)
    return {"start": start, "run": run, "stop": stop, "status": status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
