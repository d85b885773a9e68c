#!/usr/bin/env bash
# Build a minimal Debian bookworm base image from Debian packages, for machines that reach
# no container registry: debootstrap into a folder, then `podman import` it.
#
#   deploy/container/build-base.sh [IMAGE]        # default IMAGE: localhost/debian-bookworm-base
#
# The mirror is the one this host's apt uses (/etc/apt/sources.list.d/*.sources or
# /etc/apt/sources.list); override with MIRROR=http://... . Exits 0 without doing anything
# when the image already exists (FORCE=1 rebuilds it). Needs root (debootstrap, podman).
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/debian-bookworm-base}}
SUITE=${SUITE:-bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

if [ "${FORCE:-0}" != 1 ] && podman image exists "$IMAGE"; then
    echo "build-base: $IMAGE already exists, nothing to do (FORCE=1 rebuilds it)"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "build-base: debootstrap needs root" >&2; exit 1; }

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "build-base: installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

# The Debian mirror this host's apt uses: the first URI serving $SUITE itself.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas: remember URIs, print it when the stanza's Suites has $SUITE.
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { uris=""; types=""; next }
            /^URIs:/   { uris=$2 }
            /^Types:/  { types=$0 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && types ~ /deb( |$)/ && uris != "") { print uris; exit } }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '$1 == "deb" { u = ($2 ~ /^\[/) ? $3 : $2; s = ($2 ~ /^\[/) ? $4 : $3; if (s == suite) { print u; exit } }' "$f"
    done
}
MIRROR=${MIRROR:-$(host_mirror | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
echo "build-base: debootstrap $SUITE from $MIRROR into a temporary folder"

ROOTFS=$(mktemp -d /var/tmp/debian-base.XXXXXX)
trap 'rm -rf --one-file-system "$ROOTFS"' EXIT
debootstrap --variant=minbase --components=main "$SUITE" "$ROOTFS" "$MIRROR"

# apt sources inside the image: the same mirror, plus updates and security (the latter from
# the host's own security URI when it has one).
SECURITY=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
           | grep -o -E 'https?://[^ ]*debian-security' | head -n1 || true)
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
cat > "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -f "$ROOTFS/etc/apt/sources.list"

# Keep images small: no documentation, manuals or translations from later installs (copyright
# files stay), no recommends, no apt caches left in layers.
cat > "$ROOTFS/etc/dpkg/dpkg.cfg.d/01-container-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
cat > "$ROOTFS/etc/apt/apt.conf.d/01-container" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
# No service starts from package scripts during image builds.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
find "$ROOTFS/usr/share/doc" -type f ! -name copyright -delete
: > "$ROOTFS/etc/machine-id"

tar --numeric-owner -C "$ROOTFS" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$IMAGE"
echo "build-base: built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
