#!/usr/bin/env bash
# Make a local Debian bookworm base image with Python 3.11 for building docker/Dockerfile where
# no registry is reachable (tests, CI): debootstrap + podman import. Cached: does nothing when
# the image exists.  Usage: docker/build-test-base.sh [IMAGE]   (default localhost/dreamfleet-base:bookworm)
set -euo pipefail
image=${1:-localhost/dreamfleet-base:bookworm}
if podman image exists "$image"; then echo "$image"; exit 0; fi
root=$(mktemp -d /tmp/dreamfleet-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$image"
