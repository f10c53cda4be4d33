#!/usr/bin/env bash
# Creates .venv (or $DIT_VENV) and installs dit_jax with its test dependencies and the `tpu` extra
# (libtpu, ~700 MB: the compile-only pod tests compile for TPU topologies on this CPU machine).
# torch==2.13.0 goes first so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DIT_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e "$here[test,tpu]"
echo "environment ready: $venv"
