#!/usr/bin/env bash
# One prepared GPU check (about 6-8 minutes on an H100/H200): DiT-XL/2 256 px bf16 training, the product's step
# (dit-jax-train's own: config -> train.setup -> train.jit_train_step) against compiled PyTorch, each at its
# best batch, MFU against the card's rated peak; 250-step guided sampling, dit_jax's loop against the release's
# loop in PyTorch; the XLA:GPU candidate options of dit_jax/utils/xla_gpu.py; with INCEPTION=1 also FID
# Inception features of 50,000 images (bf16, about a minute more).
#   bash benchmarks/gpu.sh             # on the GPU machine
#   bash benchmarks/gpu.sh --tiny      # the same script end to end on a CPU with a tiny model (its test)
# Extra arguments go to benchmarks.gpu_bench (e.g. --batches 256 128). Run it with a 600 s limit: every section
# prints as it ends (and the JSON after training), so a cut-off run still reports what it measured.
# Output: the console, plus $OUT/gpu_bench.log, gpu_bench.json (the last JSON line) and inception_speed.log.
#
# The GPU machine has no ml_collections (configs/ needs it); the script installs it from a wheel carried in
# ${DIT_JAX_WHEELS:-.whl}/. Prepare it once on a machine with PyPI access:
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# (.whl/ is git-ignored; name it in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  wheels="${DIT_JAX_WHEELS:-.whl}"
  if ! ls "$wheels"/ml_collections-*.whl >/dev/null 2>&1; then
    echo "gpu.sh: error: ml_collections is not installed and no $wheels/ml_collections-*.whl to install it from" \
         "(pip download --no-deps --only-binary=:all: -d $wheels ml_collections==1.1.0)" >&2
    exit 1
  fi
  site="${TMPDIR:-/tmp}/dit_jax_gpu_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/ml_collections-*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import ml_collections" || { echo "gpu.sh: error: ml_collections still not importable" >&2; exit 1; }
fi
"$PY" -c "import jax; print('devices:', jax.devices())"

# PyTorch runs first and frees its cache; JAX must not grab the card up front, but may grow to 95%.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
log="$OUT_DIR/gpu_bench.log"
status=0
"$PY" -m benchmarks.gpu_bench --xla-sweep "$@" 2>&1 | tee "$log" || status=$?
grep '^{' "$log" | tail -n 1 > "$OUT_DIR/gpu_bench.json" || true

# FID Inception feature extraction over 50,000 images, bf16 (JAX only: the GPU box has no pytorch-fid).
if [ "${INCEPTION:-0}" = "1" ] || [ "${1:-}" = "--tiny" ]; then
  inc_args=(--skip-torch --batch 500 --images 50000 --variants fused-bf16)
  if [ "${1:-}" = "--tiny" ]; then inc_args=(--skip-torch --tiny --images 8 --variants fused); fi
  "$PY" -m benchmarks.inception_speed "${inc_args[@]}" 2>&1 | tee "$OUT_DIR/inception_speed.log" || status=$?
fi
exit "$status"
