#!/usr/bin/env bash
# Make a local Debian bookworm base image with Python 3.11 for building docker/Dockerfile where
# no registry is reachable (tests, CI): debootstrap + podman import (about a minute).
# Cached: does nothing when the image exists.
#
#   docker/build-test-base.sh [IMAGE]    default localhost/dreamfleet-base:bookworm
#   DEBIAN_MIRROR=http://... docker/build-test-base.sh     another mirror than deb.debian.org
set -euo pipefail
image=${1:-localhost/dreamfleet-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$image"; then echo "$image"; exit 0; fi
root=$(mktemp -d /tmp/dreamfleet-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null; then
  echo "debootstrap failed; the end of its log:" >&2
  tail -n 30 "$root/debootstrap/debootstrap.log" >&2 || true
  exit 1
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$image"
