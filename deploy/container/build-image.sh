#!/usr/bin/env bash
# Build the serving image with podman (`make image`): localhost/fashion-cnn-serve:latest.
#
#   deploy/container/build-image.sh          # IMAGE=... BASE=... to change the names
#   PODMAN_BUILD_FLAGS=--no-cache deploy/container/build-image.sh     # extra `podman build` flags
#
# 1. installs podman and runc from Debian when missing;
# 2. uses deploy/container/containers.conf (CONTAINERS_CONF): rootful podman here fails with
#    crun, and with runc unless default_ulimits is empty;
# 3. builds the Debian base image with debootstrap when it is missing (build-base.sh; only
#    for a localhost/ BASE: another BASE is pulled from its registry);
# 4. hands this host's pip configuration to the build (pip_config.py: pip.conf and the files
#    and local indexes it names, mounted read-only) and builds with the host's network.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-localhost/fashion-cnn-serve:latest}
BASE=${BASE:-localhost/debian-bookworm-base}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/container/containers.conf}

if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    echo "build-image: installing podman and runc"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman runc
fi

# A local base (localhost/...) is built here when missing; any other name is pulled by podman build.
case "$BASE" in
    localhost/*) bash deploy/container/build-base.sh "$BASE" ;;
esac

# The Python whose pip configuration is this host's (pip config list), falling back to the .venv's.
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip --version >/dev/null 2>&1 || PYTHON=.venv/bin/python
mapfile -t PIP_ARGS < <("$PYTHON" deploy/container/pip_config.py build/container/pip)
echo "build-image: pip configuration for the build: ${PIP_ARGS[*]}"

# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
podman --runtime runc build \
    --network=host \
    --format docker \
    --build-arg BASE="$BASE" \
    "${PIP_ARGS[@]}" \
    --ignorefile deploy/container/containerignore \
    ${PODMAN_BUILD_FLAGS:-} \
    -f deploy/container/Containerfile \
    -t "$IMAGE" \
    .
echo "build-image: built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
