"""Loads pytorch-fid (the parity reference) beside the CPU torch wheel, without torchvision's package init.

torchvision's PyPI wheel fails to register its C operators next to the CPU torch wheel, so `import torchvision`
raises. pytorch-fid needs only the pure-Python `torchvision.models.inception` module, so this helper puts
stand-in package modules for `torchvision`, `torchvision.models` and `torchvision.transforms` into
sys.modules: each has the installed folder as its `__path__` (so its submodules load from the real files) but
none of their `__init__.py` runs. Both packages are installed with `pip install --no-deps` by the `[fid-test]`
extra (see setup.py), so pip never resolves torchvision's torch pin to a CUDA build.

    fid = load_pytorch_fid()          # -> the pytorch_fid.inception module, or pytest.skip when not installed
    fid_score = load_fid_score()      # -> pytorch_fid.fid_score (calculate_frechet_distance)
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest

_STUBS = ("torchvision", "torchvision.models", "torchvision.transforms")


def _install_stubs() -> None:
    if isinstance(sys.modules.get("torchvision"), types.ModuleType) and getattr(
            sys.modules["torchvision"], "_dit_jax_stub", False):
        return
    spec = importlib.util.find_spec("torchvision")  # locates the folder; does not run __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision is not installed (pip install -e '.[fid-test]' / scripts/setup_env.sh)")
    root = list(spec.submodule_search_locations)[0]
    version = "0.0"
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("torchvision")
    except Exception:  # noqa: BLE001 -- only used for pytorch-fid's version check
        pass
    for name in _STUBS:
        mod = types.ModuleType(name)
        sub = name.split(".")[1:]
        mod.__path__ = [root + ("/" + "/".join(sub) if sub else "")]
        mod.__package__ = name
        mod._dit_jax_stub = True
        if name == "torchvision":
            mod.__version__ = version.split("+")[0]
        sys.modules[name] = mod
        if sub:
            setattr(sys.modules["torchvision"], sub[0], mod)
    functional = importlib.import_module("torchvision.transforms.functional")  # _presets wants these two names
    sys.modules["torchvision.transforms"].InterpolationMode = functional.InterpolationMode
    sys.modules["torchvision.transforms"].functional = functional
    inception = importlib.import_module("torchvision.models.inception")
    sys.modules["torchvision.models"].inception_v3 = inception.inception_v3


def load_pytorch_fid():
    """pytorch_fid.inception with torchvision stubbed (see the module docstring); skips if not installed."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid is not installed (pip install -e '.[fid-test]' / scripts/setup_env.sh)")
    _install_stubs()
    return importlib.import_module("pytorch_fid.inception")


def load_fid_score():
    load_pytorch_fid()
    return importlib.import_module("pytorch_fid.fid_score")
