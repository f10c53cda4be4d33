"""Which JAX platforms this machine really has: a GPU/TPU plugin installed is not yet an accelerator present.

The `tpu` extra installs libtpu on CPU machines too (it compiles for TPU pods there: --compile-only). JAX
would then try to open a TPU at start-up, spend seconds and print libtpu's error trace before falling back
to the CPU. `skip_absent_tpu()`, called by every command line before JAX starts, tells JAX not to try.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import sys


def tpu_hardware_present() -> bool:
    """A TPU chip on this machine: TPU VMs expose /dev/accel* (v2-v5e) or /dev/vfio/* (v5p, v6e) and PCI
    devices with Google's vendor id 0x1ae0."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip().lower() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def gpu_plugin_installed() -> bool:
    """A JAX CUDA/ROCm plugin is importable (the `jax_plugins` namespace package holds them)."""
    try:
        import jax_plugins  # optional: the namespace package of the CUDA/ROCm plugins, present only with them
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def accelerator_plugin_installed() -> bool:
    """True when JAX will most likely not compute on the CPU (JAX_PLATFORMS, a GPU plugin, or a TPU here)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] != "cpu"
    return (libtpu_installed() and tpu_hardware_present()) or gpu_plugin_installed()


def skip_absent_tpu() -> bool:
    """With libtpu installed but no TPU chip, no GPU plugin and no JAX_PLATFORMS: JAX_PLATFORMS=cpu.
    -> whether it was set. Must run before JAX initialises its backends."""
    if os.environ.get("JAX_PLATFORMS") or not libtpu_installed() or tpu_hardware_present() or gpu_plugin_installed():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"  # a JAX imported later, and the processes this one starts
    jax = sys.modules.get("jax")
    if jax is not None:  # imported already (the command lines import it first): it read the variable then
        jax.config.update("jax_platforms", "cpu")
    return True
