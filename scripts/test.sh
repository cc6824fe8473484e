#!/usr/bin/env bash
# The tests: install dependencies, build the release preset, run every CTest test (unit tests, README example,
# install + downstream consumer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/build.sh release
ctest --preset release "$@"
