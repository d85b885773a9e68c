"""Container health check: one real prediction through the gateway.

Healthy means the public front answers a prediction for examples/ankle_boot.png with 200 and
a label, with the service's inference key (from KEY_FILE, default /srv/app/key_file.json).
Exit 0 when healthy, 1 otherwise (the reason on stderr). Standard library only, so it
starts fast.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parents[2]


def main() -> int:
    port = (os.environ.get("GATEWAY_PORTS") or "8080").split(",")[0].strip()
    key_file = Path(os.environ.get("KEY_FILE") or APP / "key_file.json")
    model = os.environ.get("HEALTHCHECK_MODEL", "fashion_cnn")
    try:
        key = json.loads(key_file.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"unhealthy: no inference key in {key_file}: {exc}", file=sys.stderr)
        return 1
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predictions/{model}", data=(APP / "examples" / "ankle_boot.png").read_bytes(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "8"))) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if "label" not in answer:
        print(f"unhealthy: answer without a label: {answer}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
