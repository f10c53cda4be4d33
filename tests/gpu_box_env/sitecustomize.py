"""Imports as on the GPU machine (jax 0.11, torch; no tensorflow, tensorflow-datasets, diffusers, ml_collections).

Put this folder first on PYTHONPATH: tensorflow, tensorflow_datasets and diffusers are not found (by imports and
by importlib.util.find_spec alike), and with DIT_JAX_HIDE_ML_COLLECTIONS=1 ml_collections is found only outside
site-packages (where benchmarks/gpu.sh installs it from a carried wheel). tests/test_benchmarks_smoke.py runs
benchmarks/gpu.sh --tiny under it.
"""
import importlib.machinery
import os
import sys

ABSENT = ("tensorflow", "tensorflow_datasets", "diffusers")
OUTSIDE_SITE_PACKAGES = ("ml_collections",) if os.environ.get("DIT_JAX_HIDE_ML_COLLECTIONS") == "1" else ()


class GpuBoxPathFinder(importlib.machinery.PathFinder):
    """The standard path finder, blind to the modules the GPU machine does not have."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ABSENT:
            return None
        if top in OUTSIDE_SITE_PACKAGES and name == top:
            path = [p for p in sys.path if "site-packages" not in p]
        return super().find_spec(name, path, target)


sys.meta_path[:] = [GpuBoxPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
