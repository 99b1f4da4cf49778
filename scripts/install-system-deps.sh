#!/usr/bin/env bash
# System packages the integration tests use: a real Slurm (slurm-wlm, munge), a container
# engine (podman, runc, debootstrap), chromium, a C compiler (the CPU attention kernel), and
# Node/npm for Azurite, the Azure Blob emulator (its npm package goes under .cache/azurite:
# scripts/install-azurite.sh, run by `make system-deps` after this script).
# Installed only when missing, and only as root; otherwise the tests that need them say what
# is missing (and fail under CI=true).
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v chromium >/dev/null || need+=(chromium)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "not root: cannot install ${need[*]}; the integration tests that need them will report it" >&2
  exit 0
fi
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
