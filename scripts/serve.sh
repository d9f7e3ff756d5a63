#!/usr/bin/env bash
# From nothing to a served embedding: make the environment, build the example into
# model_store/encoder.mar, start TorchServe with config.properties, wait for a READY worker, embed one image.
#   scripts/serve.sh          start (restarting the server this script started before, if any)
#   scripts/serve.sh --stop   stop the server this script started, and no other
# TorchServe's `--stop` stops whatever server the pid file in $TMPDIR names. This script gives its
# server a private TMPDIR (and TEMP, where the worker sockets go) under out/serve/, so stopping
# it never touches another project's TorchServe.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE="$PWD/out/serve"
mkdir -p "$STATE/tmp" logs
export TMPDIR="$STATE/tmp" TEMP="$STATE/tmp"
# torch threads sleep soon after a pass instead of spinning on the cores the other workers use
# (docs/deployment.md#workers-per-core-and-per-gpu); read when each worker loads torch
export GOMP_SPINCOUNT=10000
stop() { .venv/bin/torchserve --stop --foreground >/dev/null 2>&1 || true; }
if [ "${1:-}" = "--stop" ]; then
  [ -x .venv/bin/torchserve ] && stop
  echo "stopped the TorchServe started by scripts/serve.sh (if it was running)"
  exit 0
fi
bash scripts/setup_env.sh --serve
PY=.venv/bin/python
mkdir -p build/example
$PY examples/custom_model/model.py build/example/model_state_dict.pth >/dev/null
$PY scripts/build_mar.py --model-file examples/custom_model/model.py --model-class CustomModel \
  --state-dict build/example/model_state_dict.pth --layer conv1 --input-shape 3,224,224 \
  --name encoder --export-path model_store
stop
rm -f key_file.json
# TorchServe keeps its stdout: send it to a file, never to a pipe.
.venv/bin/torchserve --start --ncs --ts-config config.properties --log-config log4j2.xml \
  --model-store model_store --models encoder=encoder.mar >logs/torchserve.out 2>&1
# the keys into $TOKEN/$MTOKEN, then a READY worker (/ping says Healthy while the model still loads)
source scripts/ready.sh encoder
INFERENCE=$(sed -n 's/^inference_address=//p' config.properties) $PY - <<'PY'
import io, os
import numpy as np, requests

url = os.environ["INFERENCE"]
auth = {"Authorization": f"Bearer {os.environ['TOKEN']}"}
image = np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8)  # pixels, as images are
buf = io.BytesIO(); np.save(buf, image)
r = requests.post(f"{url}/predictions/encoder", data=buf.getvalue(),
                  headers={**auth, "Content-Type": "application/x-npy"}, timeout=60)
r.raise_for_status()
embedding = np.asarray(r.json()["embeddings"][0])
print(f"served: POST /predictions/encoder -> embedding of shape {embedding.shape}")
PY
echo "TorchServe is running with config.properties (inference $(sed -n 's/^inference_address=//p' config.properties)); tokens in key_file.json."
echo "Stop it with: scripts/serve.sh --stop"
