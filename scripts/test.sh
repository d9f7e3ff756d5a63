#!/usr/bin/env bash
# Install everything (venv, pinned requirements, Java 17 check) and run the whole test suite.
#   scripts/test.sh            every test (what CI runs)
#   scripts/test.sh --quick    only the tests that start no TorchServe (not marked `server`): the tier for working
# Extra arguments go to pytest, e.g. scripts/test.sh -k npy -x, scripts/test.sh --quick -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "${1:-}" = "--quick" ]; then
  shift
  # A test that starts a TorchServe without the `server` mark fails here instead of slowing the tier
  # (image_embedder_testkit.ts_server.QUICK_TIER).
  exec env IMAGE_EMBEDDER_QUICK_TIER=1 .venv/bin/python -m pytest -m "not server" "$@"
fi
exec .venv/bin/python -m pytest "$@"
