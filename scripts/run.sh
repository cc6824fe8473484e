#!/usr/bin/env bash
# The main job: install dependencies, build the release preset, check the kernels against the fp64 oracle on the
# default problems, then run the benchmark suite (table on stdout, report in bench-report/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/build.sh release
./build/release/omniattn check
./build/release/omniattn bench "$@"
