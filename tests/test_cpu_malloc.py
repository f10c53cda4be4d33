"""glibc malloc tuning for XLA's CPU temporaries: when it applies and that it really changes the settings."""
import importlib.util
import os
import subprocess
import sys

import pytest

from dit_jax import cpu_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_step_estimate_separates_the_digits_model_from_dit():
    digits, s2 = _config("configs/digits.py"), _config("configs/dit_s2.py")
    assert cpu_malloc.training_step_bytes(digits) < cpu_malloc.MIN_STEP_BYTES  # contention would cost 25% there
    assert cpu_malloc.training_step_bytes(s2) > cpu_malloc.MIN_STEP_BYTES
    digits.model.depth = 40  # overrides count
    assert cpu_malloc.training_step_bytes(digits) == 10 * cpu_malloc.training_step_bytes(_config("configs/digits.py"))


def _run(env_value, code="print(cpu_malloc.configure())"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("DIT_JAX_MALLOC_TUNING", None)
    if env_value is not None:
        env["DIT_JAX_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", "from dit_jax import cpu_malloc\n" + code], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_configure_applies_once_and_honours_the_switch():
    assert _run(None) == ["True"]
    assert _run("0") == ["False"]
    assert _run(None, "print(cpu_malloc.configure(step_bytes=1024))") == ["False"]  # small steps: untouched
    assert _run("1", "print(cpu_malloc.configure(step_bytes=1024))") == ["True"]  # forced
    assert _run(None, "print(cpu_malloc.configure(), cpu_malloc.configure(step_bytes=1))") == ["True", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_are_reused_instead_of_mapped_fresh():
    """A 64 MB block freed and allocated again: with the settings it comes from the heap (no new mapping)."""
    code = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
print(cpu_malloc.configure())
def touch_cycle():
    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)
touch_cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch_cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    applied, faults = _run(None, code)
    assert applied == "True" and int(faults) < 1000  # 5 x 16384 pages without the settings
    applied, faults = _run("0", code)
    assert applied == "False" and int(faults) > 5 * 16000


def test_libtpu_without_tpu_chips_keeps_the_cpu_settings(monkeypatch):
    """The `tpu` extra installs libtpu on CPU machines (compile-only pod checks): that alone is no accelerator."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a))
    monkeypatch.setattr(cpu_malloc, "tpu_hardware_present", lambda: False)
    monkeypatch.setitem(sys.modules, "jax_plugins", None)  # no CUDA/ROCm plugin either
    assert not cpu_malloc._accelerator_plugin_installed()
    monkeypatch.setattr(cpu_malloc, "tpu_hardware_present", lambda: True)
    assert cpu_malloc._accelerator_plugin_installed()
