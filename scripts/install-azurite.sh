#!/usr/bin/env bash
# Azurite, the Azure Blob emulator the storage tests start (tests/stores.py), from npm into
# .cache/azurite of the repository (no global install, no root). Needs node and npm, which
# scripts/install-system-deps.sh installs from Debian; without them this says so and the az://
# tests report what is missing (and fail under CI=true).
set -euo pipefail
version=3.37.0
dir="$(cd "$(dirname "$0")/.." && pwd)/.cache/azurite"
bin="$dir/node_modules/.bin/azurite-blob"
if [ -x "$bin" ] && grep -q "\"version\": \"$version\"" "$dir/node_modules/azurite/package.json" 2>/dev/null; then exit 0; fi
if ! command -v npm >/dev/null; then
  echo "npm not found: cannot install azurite; the az:// storage tests will report it" >&2
  exit 0
fi
echo "installing azurite $version into $dir" >&2
npm install --prefix "$dir" --no-audit --no-fund --silent "azurite@$version"
