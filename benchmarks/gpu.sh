#!/usr/bin/env bash
# One prepared GPU check (a few minutes on an H100): DiT-XL/2 256 px bf16 training MFU, JAX vs compiled PyTorch,
# 250-step guided sampling, and FID Inception features of 50,000 256-px images (float32, then bf16). Runs on CPU too with a tiny config:  bash benchmarks/gpu.sh --tiny
# Output: the console table plus a JSON line; also saved to ${OUT:-.}/gpu_bench.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
"$PY" -c "import jax; print('devices:', jax.devices())"
# PyTorch runs first and frees its cache; JAX must not grab the card up front, but may grow to 95%.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
log="${OUT:-/tmp}/gpu_bench.log"
"$PY" -m benchmarks.gpu_bench "$@" 2>&1 | tee "$log"
tail -n 1 "$log" > "${OUT:-/tmp}/gpu_bench.json"
# FID Inception feature extraction over 50,000 images (JAX only: the GPU box has no torchvision, so pytorch-fid
# is not timed here; benchmarks/inception_speed.py also skips it by itself when it cannot be loaded).
inc_args=(--skip-torch --batch 500 --images 50000)
variants=(fused fused-bf16)
if [ "${1:-}" = "--tiny" ]; then inc_args=(--skip-torch --tiny --images 8); variants=(fused); fi
for v in "${variants[@]}"; do
  "$PY" -m benchmarks.inception_speed "${inc_args[@]}" --variants "$v" 2>&1 | tee -a "${OUT:-/tmp}/inception_speed.log"
done
