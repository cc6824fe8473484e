#!/usr/bin/env bash
# The main job: install dependencies, build the release preset, then check every kernel against the fp64 oracle on
# the default workload suite and print the table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/build.sh release
./build/release/omniattn check "$@"
