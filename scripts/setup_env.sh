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
# The FID Inception parity reference: pytorch-fid and torchvision (for its pure-Python inception module only).
# --no-deps, pinned: resolving their torch requirement could replace the CPU torch with a CUDA build, and
# torchvision must be the release built for this torch. Neither is a dependency of dit_jax. torchvision's
# files go outside the import path (installed as a package, diffusers would import it, and its C ops do not
# load beside the CPU torch wheel); the tests load its pure-Python inception module through
# convert/reference/pytorch_fid.py.
"$venv/bin/python" -m pip install --quiet --no-deps "pytorch-fid==0.3.0"
"$venv/bin/python" -m pip install --quiet --no-deps --upgrade --target "$venv/share/torchvision-files" "torchvision==0.28.0"
echo "environment ready: $venv"
