#!/usr/bin/env bash
# Installs the environment (scripts/setup_env.sh) and runs the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/setup_env.sh"
cd "$here"
exec "${DIT_VENV:-$here/.venv}/bin/python" -m pytest -q -rs --fail-on-skip "$@"  # a skipped test fails the run (conftest.py)
