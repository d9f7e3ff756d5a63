#!/usr/bin/env bash
# Make .venv with every pinned requirement, and check for Java 17 (TorchServe's frontend).
# Idempotent: a second run only checks.
#   scripts/setup_env.sh           everything: serving, the tools' formats, the examples, the bench, the tests
#   scripts/setup_env.sh --serve   what a server needs (requirements-serve.txt): build, serve, the client;
#                                  a .venv that already has everything is left as it is
# MODEL_REQUIREMENTS=path/to/requirements.txt also installs a model's own packages into .venv (a server
# image with them baked in: deploy/Dockerfile's build argument of that name).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! java -version 2>&1 | grep -q 'version "17'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Java 17 not found: installing openjdk-17-jre-headless" >&2
    (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) >&2
  else
    echo "TorchServe needs Java 17: install it (Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless)" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# One stamp per set: everything (.requirements.sha) includes what serving needs (.serve.sha).
project="pyproject.toml client/pyproject.toml ${MODEL_REQUIREMENTS:-}"
stamp=.venv/.requirements.sha
want=$(cat requirements-serve.txt requirements.txt $project | sha256sum | cut -d' ' -f1)
serve_stamp=.venv/.serve.sha
serve_want=$(cat requirements-serve.txt $project | sha256sum | cut -d' ' -f1)
current() { [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] || { [ "$SERVE" = 1 ] && [ "$(cat "$serve_stamp" 2>/dev/null)" = "$serve_want" ]; }; }
SERVE=$([ "${1:-}" = "--serve" ] && echo 1 || echo 0)
if ! current && [ -L .venv ]; then
  # A linked .venv belongs to another checkout (the docs run's scratch copy links the real one): installing
  # from here would point its editable install at this copy. Install from the checkout that owns it.
  echo "setup_env.sh: .venv links to $(readlink -f .venv), whose requirements changed: run scripts/setup_env.sh in its checkout" >&2
  exit 1
fi
if ! current; then
  .venv/bin/python -m pip install -q -r "$([ "$SERVE" = 1 ] && echo requirements-serve.txt || echo requirements.txt)" >&2
  # This project itself (engine, client, tools, bench, testkit, the image-embedder command), editable, with the
  # versions pinned above: nothing else is resolved or downloaded.
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >&2
  if [ -n "${MODEL_REQUIREMENTS:-}" ]; then
    .venv/bin/python -m pip install -q -r "$MODEL_REQUIREMENTS" >&2
  fi
  [ "$SERVE" = 1 ] || echo "$want" > "$stamp"
  echo "$serve_want" > "$serve_stamp"
fi
[ "$SERVE" = 1 ] && exit 0
# KServe's SDK models for the manifest tests, without the KServe server's dependencies.
if ! .venv/bin/python -m pip show kserve 2>/dev/null | grep -qx 'Version: 0.21.0'; then
  .venv/bin/python -m pip install -q --no-deps -r deploy/requirements-kserve.txt >&2
fi
