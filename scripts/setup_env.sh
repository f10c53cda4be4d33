#!/usr/bin/env bash
# Creates .venv (or $DIT_VENV) and installs dit_jax with its test dependencies and the `tpu` extra
# (libtpu, ~700 MB: the compile-only pod tests compile for TPU topologies on this CPU machine).
# torch==2.13.0 goes first so the CPU wheel is taken instead of a multi-GB CUDA build.
# The installer is uv (installed into the environment from PyPI first): 40 s instead of pip's 141 s for the
# whole environment on this 2-core machine with empty caches (2026-12-06). It is given pip's configuration
# (scripts/uv_args.py: local wheels, indexes, constraints), so it resolves what pip would.
# DIT_INSTALLER=pip installs with pip alone.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DIT_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if [ "${DIT_INSTALLER:-uv}" = "uv" ] && "$py" -m pip install --quiet uv; then
  mapfile -t uv_opts < <("$py" "$here/scripts/uv_args.py")
  install() {  # pip where uv fails (an index or an option uv does not take)
    "$venv/bin/uv" pip install --python "$py" --quiet "${uv_opts[@]}" "$@" \
      || { echo "setup_env.sh: uv failed on: $*; installing with pip" >&2; "$py" -m pip install --quiet "$@"; }
  }
else
  "$py" -m pip install --quiet --upgrade pip
  install() { "$py" -m pip install --quiet "$@"; }
fi
install "torch==2.13.0"
install -e "$here[test,tpu]" "torch==2.13.0"
# The FID Inception parity reference: pytorch-fid and torchvision (for its pure-Python inception module only).
# --no-deps, pinned: resolving their torch requirement could replace the CPU torch with a CUDA build, and
# torchvision must be the release built for this torch. Neither is a dependency of dit_jax. torchvision's
# files go outside the import path (installed as a package, diffusers would import it, and its C ops do not
# load beside the CPU torch wheel); the tests load its pure-Python inception module through
# convert/reference/pytorch_fid.py.
install --no-deps "pytorch-fid==0.3.0"
install --no-deps --upgrade --target "$venv/share/torchvision-files" "torchvision==0.28.0"
"$py" -c "import torch; print('environment ready:', '$venv', '(torch', torch.__version__ + ')')"
