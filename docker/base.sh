#!/usr/bin/env bash
# A base image from Debian packages alone (no registry needed): python3 3.11 with venv and pip,
# ca-certificates, redis-server. Usage: docker/base.sh [IMAGE] (default nasq-base:bookworm).
# Needs root and debootstrap. The mirror: $NASQ_DEBIAN_MIRROR, else this machine's apt source,
# else debootstrap's own default.
set -euo pipefail
IMAGE=${1:-nasq-base:bookworm}
MIRROR=${NASQ_DEBIAN_MIRROR:-$( (grep -h -m1 -o 'https\?://[^ ]*debian/\?$' /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list 2>/dev/null || true) | head -1)}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "base $IMAGE exists"; exit 0; fi
ROOTFS=$(mktemp -d /tmp/nasq-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm from ${MIRROR:-the default mirror of debootstrap} ..."
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,redis-server,redis-tools,procps \
  bookworm "$ROOTFS" ${MIRROR:+"$MIRROR"} >/dev/null
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import -c 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
