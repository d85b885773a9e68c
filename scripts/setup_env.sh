#!/usr/bin/env bash
# Install what the project needs: Java 17 and nginx (the gateway; only where missing), Prometheus, Chromium and
# PostgreSQL for the tests, and a
# .venv with the pinned Python stack from pyproject.toml. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if ! command -v java >/dev/null 2>&1; then
    echo "java not found: installing openjdk-17-jre-headless (TorchServe's frontend runs on Java 17)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless
fi

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "nginx not found: installing nginx-light (the gateway in front of TorchServe: make serve)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light
fi

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "prometheus/promtool not found: installing Debian's prometheus (deploy/monitoring tests: docs/operations.md#alerts)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # --no-install-recommends: no node exporter; Debian's policy-rc.d in containers keeps the service from starting
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
    # on a host with systemd the package starts a server on :9090: stop the one this install started
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        $SUDO systemctl disable --now prometheus
    fi
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "chromium/chromedriver not found: installing Debian's chromium + chromium-driver (the demo's browser test: tests/integration/test_demo.py)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi

if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "PostgreSQL not found: installing Debian's postgresql (the feedback store's tests start their own cluster: tests/integration/test_feedback_postgres.py)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
    # on a host with systemd the package starts a cluster on :5432: stop the one this install started
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postgresql 2>/dev/null; then
        $SUDO systemctl disable --now postgresql
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
mkdir -p build
# Dependencies live in one place: pyproject.toml ([project] + the dev and demo extras).
"$VENV/bin/python" - > build/requirements.txt <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["dev"] + extras["demo"]))
PY
echo "installing the pinned stack into $VENV (torch, torchvision, torchserve, ...)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r build/requirements.txt
# kserve's client in a venv of its own: its pins (psutil<6, pandas<3) would move .venv's (pyproject.toml says why).
"$VENV/bin/python" - > build/requirements-kserve.txt <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["kserve-client"]))
PY
if [ ! -x "$VENV/kserve-client/bin/python" ]; then
    echo "creating $VENV/kserve-client (kserve's client, for the integration tests)"
    "$PYTHON" -m venv "$VENV/kserve-client"
fi
"$VENV/kserve-client/bin/python" -m pip install --quiet --disable-pip-version-check -r build/requirements-kserve.txt
touch "$VENV/.installed"
