#!/usr/bin/env bash
# Installs the Debian 12 packages omniattn needs to build, test and run its Python bits. Idempotent: when everything is
# already installed it does nothing (no apt-get update), so it is cheap to call from the other scripts.
set -euo pipefail

PACKAGES=(
  cmake ninja-build g++ clang libclang-rt-14-dev pkg-config git
  libhwy-dev libgtest-dev libgmock-dev libomp-dev libopenblas-dev
  python3 python3-dev python3-numpy python3-pybind11 python3-pytest python3-matplotlib python3-torch
  libopenmpi-dev openmpi-bin python3-mpi4py
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "setup: missing packages and not root (and no sudo): ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
