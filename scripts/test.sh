#!/usr/bin/env bash
# Install everything (venv, pinned requirements, Java 17 check) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k npy -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
