"""Run and measure the serving image with podman (built by ``make image``; docs/container.md).

    python -m scripts.deploy.image size                  # podman image inspect --format {{.Size}}
    python -m scripts.deploy.image coldstart --runs 3    # container start -> first 200 through the gateway

Every podman call uses deploy/container/containers.conf (CONTAINERS_CONF) and the runc runtime,
which rootful podman on these machines needs. Containers started here publish the gateway's
three ports on free loopback ports and are always removed. Used by tests/integration/test_image.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("IMAGE", "localhost/fashion-cnn-serve:latest")
CONTAINERS_CONF = REPO / "deploy" / "container" / "containers.conf"
KEY_FILE = "/srv/app/run/key_file.json"  # KEY_FILE in the image
EXAMPLE = REPO / "examples" / "ankle_boot.png"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    return subprocess.run(["podman", "--runtime", "runc", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=timeout)


def available() -> bool:
    return shutil.which("podman") is not None


def image_exists(image: str = IMAGE) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def image_size(image: str = IMAGE) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def build() -> None:
    """``make image``'s script (installs podman/runc when missing, builds the base when missing)."""
    subprocess.run(["bash", str(REPO / "deploy" / "container" / "build-image.sh")], cwd=REPO, check=True, timeout=3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Container:
    name: str
    inference: str
    management: str
    metrics: str
    started: float  # time.monotonic() just before `podman run`

    def key(self, kind: str = "inference") -> str | None:
        """The service key the gateway checks, read from inside the container (None until written)."""
        done = podman("exec", self.name, "cat", KEY_FILE, check=False)
        if done.returncode != 0:
            return None
        try:
            return json.loads(done.stdout)[kind]["key"]
        except (ValueError, KeyError):
            return None

    def running(self) -> bool:
        done = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return done.stdout.strip() == "true"

    def logs(self, tail: int = 40) -> str:
        done = podman("logs", "--tail", str(tail), self.name, check=False)
        return (done.stdout + done.stderr).strip()

    def predict(self, body: bytes, key: str, **kw) -> requests.Response:
        return requests.post(f"{self.inference}/predictions/fashion_cnn", data=body,
                             headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})}, timeout=30, **kw)

    def wait_first_200(self, deadline_s: float = 300.0) -> float:
        """Seconds from `podman run` to the first 200 prediction through the gateway."""
        body = EXAMPLE.read_bytes()
        key = None
        while time.monotonic() - self.started < deadline_s:
            key = key or self.key()
            if key:
                try:
                    if self.predict(body, key).status_code == 200:
                        return time.monotonic() - self.started
                except requests.RequestException:
                    pass
            if not self.running():
                raise RuntimeError(f"container {self.name} exited before answering:\n{self.logs()}")
            time.sleep(0.2)
        raise TimeoutError(f"no 200 through the gateway of {self.name} within {deadline_s:.0f} s:\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "--force", "--time", "10", self.name, check=False, timeout=60)


def run(image: str = IMAGE, env: dict[str, str] | None = None, extra: list[str] | None = None) -> Container:
    """``podman run -d`` with the three public ports on free loopback ports."""
    ports = [free_port() for _ in range(3)]
    name = f"fashion-cnn-test-{uuid.uuid4().hex[:8]}"
    args = ["run", "--detach", "--name", name]
    for host_port, port in zip(ports, (8080, 8081, 8082)):
        args += ["--publish", f"127.0.0.1:{host_port}:{port}"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    started = time.monotonic()
    podman(*args, *(extra or []), image)
    inference, management, metrics = (f"http://127.0.0.1:{p}" for p in ports)
    return Container(name, inference, management, metrics, started)


def coldstart(runs: int, image: str = IMAGE, replicas: int = 1) -> list[float]:
    times = []
    for i in range(runs):
        container = run(image, env={"REPLICAS": str(replicas)})
        try:
            seconds = container.wait_first_200()
        finally:
            container.remove()
        load = os.getloadavg()[0]
        print(f"run {i + 1}: {seconds:.1f} s from podman run to the first 200 through the gateway "
              f"(host load average {load:.1f} on {os.cpu_count()} cores)", flush=True)
        times.append(seconds)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("size", "coldstart"))
    p.add_argument("--image", default=IMAGE)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--replicas", type=int, default=1)
    args = p.parse_args(argv)
    if not available():
        print("podman is not installed (make image installs it)", file=sys.stderr)
        return 2
    if args.action == "size":
        size = image_size(args.image)
        print(f"{args.image}: {size} bytes ({size / 1e9:.2f} GB, {size / 2**30:.2f} GiB)")
        return 0
    times = coldstart(args.runs, args.image, args.replicas)
    print(f"cold start, {args.replicas} replica(s): median {statistics.median(times):.1f} s "
          f"(runs: {', '.join(f'{t:.1f}' for t in times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
