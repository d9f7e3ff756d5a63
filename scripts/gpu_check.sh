#!/usr/bin/env bash
# The GPU path, checked on a machine with CUDA, in one go (under 8 minutes):
#   1. the card, driver and torch it finds;
#   2. installs what is missing (pinned versions from requirements.txt; from ./wheels when that folder
#      exists, for machines that reach no package index) - torch itself is never installed here;
#   3. the cuda-marked tests (tests/test_cuda.py, run with --noconftest: TorchServe is not needed);
#   4. a short in-process bench (`scripts/bench.py gpu`: ResNet-18/50-shaped, b1/b32, fp32/fp16,
#      uint8 .npy and JPEG) and, when Java 17 and TorchServe are there, `bench.py payloads --quick`;
#   5. one JSON of results: $OUT/gpu_check.json (OUT defaults to out/).
# Usage: bash scripts/gpu_check.sh          (exits 2 when there is no CUDA device)
#        ALLOW_CPU=1 PYTHON=.venv/bin/python GPU_BENCH_ARGS="--gpu-models ResNet18" bash scripts/gpu_check.sh
#        (a dry run of the script itself on a CPU machine: the cuda tests skip, the bench runs on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
# the engine, the bench and the testkit, without `pip install -e .`
export PYTHONPATH="$PWD/handler:$PWD/tools:$PWD/bench:$PWD/testkit${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3; do
    if "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ] && [ -z "${ALLOW_CPU:-}" ]; then
  echo "gpu_check: no Python here whose torch sees a CUDA device" >&2
  exit 2
fi
start=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - start ))s] $*" >&2; }

log "python: $PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true

# Install only what is missing; never torch (a CUDA machine brings its own build).
missing=()
for pair in numpy:numpy PIL:pillow yaml:pyyaml pytest:pytest safetensors:safetensors requests:requests psutil:psutil; do
  module="${pair%%:*}"; package="${pair##*:}"
  "$PY" -c "import $module" 2>/dev/null || missing+=("$(grep -hE "^$package==" requirements-serve.txt requirements.txt || echo "$package")")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  if [ -d wheels ]; then
    timeout 120 "$PY" -m pip install -q --no-index --find-links wheels "${missing[@]}" >&2 || log "install failed"
  else
    timeout 120 "$PY" -m pip install -q "${missing[@]}" >&2 || log "install failed (no package index?)"
  fi
fi

log "cuda-marked tests"
timeout 240 "$PY" -m pytest --noconftest -p no:cacheprovider -o addopts="" -q -rs tests/test_cuda.py \
  --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.txt" 2>&1
tests_rc=$?
tail -5 "$OUT/cuda_tests.txt" >&2

log "in-process GPU bench"
timeout 200 "$PY" scripts/bench.py gpu ${GPU_BENCH_ARGS:-} --json "$OUT/gpu_bench.json" > "$OUT/gpu_bench.txt" 2>&1
bench_rc=$?

served_rc=skipped
if java -version 2>&1 | grep -q 'version "17' && "$PY" -c "import ts, model_archiver" 2>/dev/null; then
  log "served bench (bench.py payloads --quick --models resnet18)"
  timeout 150 "$PY" scripts/bench.py payloads --quick --models resnet18 --json "$OUT/bench_quick.json" > "$OUT/bench_quick.txt" 2>&1
  served_rc=$?
fi

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$served_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
import torch

out, tests_rc, bench_rc, served_rc, seconds = sys.argv[1:]
result = {"gpu": open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else None,
          "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)", "torch": torch.__version__, "cuda": torch.version.cuda,
          "tests_rc": int(tests_rc), "bench_rc": int(bench_rc), "served_bench_rc": served_rc, "seconds": int(seconds)}
try:
    suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot().iter("testcase")
    result["tests"] = {f"{c.get('name')}": ("failed" if c.find("failure") is not None or c.find("error") is not None
                                            else "skipped" if c.find("skipped") is not None else "passed") for c in suite}
except (OSError, ET.ParseError) as exc:
    result["tests"] = f"no report: {exc}"
for name, key in (("gpu_bench.json", "bench"), ("bench_quick.json", "served_bench")):
    path = os.path.join(out, name)
    if os.path.exists(path):
        data = json.load(open(path))
        result[key] = data.get("rows", data) if key == "bench" else {"rows": data.get("rows"), "errors": data.get("errors")}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps({k: v for k, v in result.items() if k not in ("bench", "served_bench")}, indent=1))
EOF
log "done: $OUT/gpu_check.json"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
