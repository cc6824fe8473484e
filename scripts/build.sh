#!/usr/bin/env bash
# Configures and builds one CMake preset (default: release). Usage: scripts/build.sh [preset]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
preset="${1:-release}"
cmake --preset "$preset"
cmake --build --preset "$preset" --parallel "${OMNIATTN_JOBS:-$(nproc)}"
