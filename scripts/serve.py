"""Start, stop and inspect the TorchServe serving this repository's model store.

    python -m scripts.serve start    # torchserve --start --ts-config config.properties, wait until the model answers
    python -m scripts.serve status
    python -m scripts.serve stop     # torchserve --stop

Used by ``make serve`` / ``make stop``. Starting twice is safe: if the model
already answers, ``start`` only prints how to call it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.tsclient import REPO, ApiError, TorchServeClient, wait_ready

EXAMPLE = REPO / "examples" / "ankle_boot.png"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--config", type=Path, default=REPO / "config.properties")
    p.add_argument("--model", default="fashion_cnn")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the first answer")
    return p


def torchserve() -> str:
    local = Path(sys.executable).parent / "torchserve"
    return str(local) if local.exists() else shutil.which("torchserve") or "torchserve"


def answers(client: TorchServeClient, model: str) -> bool:
    try:
        return client.predict(model, EXAMPLE.read_bytes(), check=False).status_code == 200
    except Exception:
        return False


def how_to_call(client: TorchServeClient, model: str, answer: dict) -> str:
    inf, mgmt, met = client.endpoints.inference, client.endpoints.management, client.endpoints.metrics
    key_file = client.key_file.relative_to(REPO) if client.key_file.is_relative_to(REPO) else client.key_file
    return f"""
TorchServe is serving '{model}'  (example: {EXAMPLE.name} -> {answer['label']}, confidence {answer['confidence']:.3f})

  inference   {inf}/predictions/{model}
  management  {mgmt}/models/{model}
  metrics     {met}/metrics
  keys        {key_file}  (token auth is on; inference keys expire after 60 min: renew with
              python -m scripts.ctl health, or GET {mgmt}/token?type=inference with the API key)

Call it:
  TOKEN=$(python3 -c 'import json; print(json.load(open("{key_file}"))["inference"]["key"])')
  curl -H "Authorization: Bearer $TOKEN" -T examples/ankle_boot.png {inf}/predictions/{model}
  curl -H "Authorization: Bearer $TOKEN" -H "X-TTA: off" -H "X-Top-K: 5" -F data=@examples/coat.png {inf}/predictions/{model}

Or with the client:  .venv/bin/python -m scripts.client examples/*.png
Stop it with:        make stop
"""


def start(args) -> int:
    client = TorchServeClient.from_config(args.config)
    if answers(client, args.model):
        print(how_to_call(client, args.model, client.predict(args.model, EXAMPLE.read_bytes()).json()))
        return 0
    (REPO / "logs").mkdir(exist_ok=True)
    cmd = [torchserve(), "--start", "--ts-config", str(args.config), "--ncs"]
    print("starting:", " ".join(cmd))
    with open(REPO / "logs" / "torchserve_start.log", "ab") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    try:
        answer = wait_ready(client, args.model, EXAMPLE.read_bytes(), deadline_s=args.timeout)
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}\nlast lines of logs/model_log.log:", file=sys.stderr)
        log = REPO / "logs" / "model_log.log"
        if log.exists():
            print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
        return 1
    print(how_to_call(client, args.model, answer))
    return 0


def stop(args) -> int:
    result = subprocess.run([torchserve(), "--stop"], cwd=REPO, capture_output=True, text=True)
    print((result.stdout + result.stderr).strip())
    return 0


def status(args) -> int:
    client = TorchServeClient.from_config(args.config)
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
