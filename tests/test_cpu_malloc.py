"""glibc malloc tuning for XLA's CPU temporaries: when it applies and that it really changes the settings."""
import os
import subprocess
import sys

import pytest

from dit_jax.utils import cpu_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_estimate_separates_the_digits_model_from_dit():
    from configs import default, digits
    from dit_jax.cli.train import step_bytes

    d, s2 = digits.get_config(), default.get_config("S/2")
    assert step_bytes(d) < cpu_malloc.MIN_STEP_BYTES  # contention would cost 25% there
    assert step_bytes(s2) > cpu_malloc.MIN_STEP_BYTES
    d.model.depth = 40  # overrides count
    assert step_bytes(d) == 10 * step_bytes(digits.get_config())


def _run(env_value, code="print(cpu_malloc.configure())"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("DIT_JAX_MALLOC_TUNING", None)
    if env_value is not None:
        env["DIT_JAX_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", "from dit_jax.utils import cpu_malloc\n" + code], env=env,
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
