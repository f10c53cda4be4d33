"""Prints uv's `pip install` options equivalent to pip's configuration on this machine (one per line).

uv reads no pip.conf and no PIP_* variables, yet a machine's pip configuration is often what makes the install
right: here it is a local wheel folder holding torch's CPU build (PyPI's torch==2.13.0 for Linux is the CUDA
build), local package indexes and a constraints file. scripts/setup_env.sh passes these options to uv so that
uv resolves what pip would. `pip config list` already merges the files and the PIP_* variables.

    python scripts/uv_args.py    # run with the virtual environment's python (its pip reads the config)
"""
from __future__ import annotations

import shlex
import subprocess
import sys

# pip option -> uv option; values that pip splits on whitespace are passed one per option
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def pip_config() -> dict:
    """{option: value} of this python's pip (`pip config list`)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    return parse_pip_config(out)


def parse_pip_config(text: str) -> dict:
    """{option: value} from `pip config list` lines such as global.find-links='/opt/wheels'; the
    environment's :env: entries win over the files' (as pip applies them)."""
    found, from_env = {}, {}
    for line in text.splitlines():
        scope_key, _, value = line.partition("=")
        scope, _, key = scope_key.rpartition(".")
        if key in OPTIONS:
            (from_env if scope == ":env:" else found)[key] = " ".join(shlex.split(value))
    found.update(from_env)
    return found


def uv_args(config: dict) -> list:
    args = []
    for key, flag in OPTIONS.items():
        for value in config.get(key, "").split():
            args += [flag, value]
    if "extra-index-url" in config or "find-links" in config:
        args += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version among all sources
    return args


if __name__ == "__main__":
    print("\n".join(uv_args(pip_config())))
