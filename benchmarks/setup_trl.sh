#!/usr/bin/env bash
# Install TRL for benchmarks/trl_bench.py only: into .bench/trl (git-ignored), without its dependencies (the
# project's venv already has them), so it never becomes a dependency of flowalign. trl_bench.py puts .bench/trl
# on sys.path and runs this same install itself when trl is missing.
#     bash benchmarks/setup_trl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --no-deps --target .bench/trl trl==1.16.0
