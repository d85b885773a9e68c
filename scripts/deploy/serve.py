"""Start, stop and inspect the TorchServe serving this repository's model store.

    python -m scripts.deploy.serve start    # torchserve --start --ts-config config.properties, wait until the model answers
    python -m scripts.deploy.serve status
    python -m scripts.deploy.serve stop     # torchserve --stop

Used by ``make serve`` / ``make stop``. Starting twice is safe: if the model
already answers, ``start`` only prints how to call it.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from scripts.ops.tsclient import REPO, ApiError, TorchServeClient, read_properties, wait_ready

EXAMPLE = REPO / "examples" / "ankle_boot.png"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--config", type=Path, default=REPO / "config.properties")
    p.add_argument("--workdir", type=Path, default=REPO,
                   help="where TorchServe runs: relative paths in the config, key_file.json and logs/ are here")
    p.add_argument("--model", default="fashion_cnn")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the first answer")
    return p


def torchserve() -> str:
    local = Path(sys.executable).parent / "torchserve"
    return str(local) if local.exists() else shutil.which("torchserve") or "torchserve"


def server_pid() -> int | None:
    """The frontend's pid, from the pid file torchserve --start writes into the temp dir."""
    try:
        return int((Path(tempfile.gettempdir()) / ".model_server.pid").read_text())
    except (OSError, ValueError):
        return None


def busy_ports(config: Path) -> list[str]:
    """Ports in config.properties (REST and gRPC) that something already listens on."""
    props = read_properties(config)
    wanted = {
        "inference_address": props.get("inference_address", "http://127.0.0.1:8080").rsplit(":", 1)[-1],
        "management_address": props.get("management_address", "http://127.0.0.1:8081").rsplit(":", 1)[-1],
        "metrics_address": props.get("metrics_address", "http://127.0.0.1:8082").rsplit(":", 1)[-1],
        "grpc_inference_port": props.get("grpc_inference_port", "7070"),
        "grpc_management_port": props.get("grpc_management_port", "7071"),
    }
    busy = []
    for name, port in wanted.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", int(port)))
            except OSError:
                busy.append(f"port {port} ({name})")
    return busy


def answers(client: TorchServeClient, model: str) -> bool:
    try:
        return client.predict(model, EXAMPLE.read_bytes(), check=False).status_code == 200
    except Exception:
        return False


def how_to_call(client: TorchServeClient, model: str, answer: dict) -> str:
    inf, mgmt, met = client.endpoints.inference, client.endpoints.management, client.endpoints.metrics
    key_file = client.key_file.relative_to(Path.cwd()) if client.key_file.is_relative_to(Path.cwd()) else client.key_file
    return f"""
TorchServe is serving '{model}'  (example: {EXAMPLE.name} -> {answer['label']}, confidence {answer['confidence']:.3f})

  inference   {inf}/predictions/{model}
  management  {mgmt}/models/{model}
  metrics     {met}/metrics
  keys        {key_file}  (token auth is on; inference keys expire after 60 min: renew with
              python -m scripts.ops.ctl health, or GET {mgmt}/token?type=inference with the API key)

Call it:
  TOKEN=$(python3 -c 'import json; print(json.load(open("{key_file}"))["inference"]["key"])')
  curl -H "Authorization: Bearer $TOKEN" -T examples/ankle_boot.png {inf}/predictions/{model}
  curl -H "Authorization: Bearer $TOKEN" -H "X-TTA: off" -H "X-Top-K: 5" -F data=@examples/coat.png {inf}/predictions/{model}

Or with the client:  .venv/bin/python -m scripts.ops.client examples/*.png
Stop it with:        make stop
"""


def start(args) -> int:
    client = TorchServeClient.from_config(args.config, args.workdir)
    if answers(client, args.model):
        print(how_to_call(client, args.model, client.predict(args.model, EXAMPLE.read_bytes()).json()))
        return 0
    busy = busy_ports(args.config)
    if busy:
        print(f"error: cannot start TorchServe: {', '.join(busy)} already in use by another process. "
              f"Stop it, or change the port in {args.config.name}.", file=sys.stderr)
        return 1
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [torchserve(), "--start", "--ts-config", str(args.config), "--ncs"]
    print("starting:", " ".join(cmd))
    start_log = logs / "torchserve_start.log"
    with open(start_log, "ab") as log:
        subprocess.run(cmd, cwd=args.workdir, stdout=log, stderr=subprocess.STDOUT, check=True)
    pid = server_pid()
    try:
        answer = wait_ready(client, args.model, EXAMPLE.read_bytes(), deadline_s=args.timeout,
                            alive=lambda: pid is None or (psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE))
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        for log in (start_log, logs / "model_log.log"):
            if log.exists():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                print(f"--- last lines of {log}:\n{tail}", file=sys.stderr)
        return 1
    print(how_to_call(client, args.model, answer))
    return 0


def stop(args) -> int:
    result = subprocess.run([torchserve(), "--stop"], cwd=args.workdir, capture_output=True, text=True)
    print((result.stdout + result.stderr).strip())
    return 0


def status(args) -> int:
    client = TorchServeClient.from_config(args.config, args.workdir)
    try:
        print("ping:", client.ping())
        for entry in client.describe(args.model):
            workers = ", ".join(f"{w['id']}:{w['status']}" for w in entry["workers"])
            print(f"{entry['modelName']} v{entry['modelVersion']}: workers [{workers}]")
    except (ApiError, OSError) as exc:
        print(f"not serving: {exc}")
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    return {"start": start, "stop": stop, "status": status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
