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
@pytest.mark.parametrize("huge_pages", [False, True])
def test_large_blocks_are_reused_instead_of_mapped_fresh(huge_pages):
    """A 64 MiB block freed and allocated again: with the settings it comes from the heap (no new mapping).

    Page-fault counts depend on the page size: ~16,400 per cycle with 4 KiB pages, ~550 with transparent huge
    pages (THP "always", or madvise(MADV_HUGEPAGE) as the huge_pages case asks for), so the test compares the
    two runs instead of fixed thresholds: without the settings every cycle faults at least once per 2 MiB;
    with them the loop faults 20 times less (measured: 0 with the settings; 81,925 and 2,720 without).
    """
    code = f"""
import ctypes, resource
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
print(cpu_malloc.configure())
def touch_cycle():
    p = libc.malloc(64 << 20)
    if {huge_pages}:  # MADV_HUGEPAGE = 14 on the block's pages (a no-op where THP is off)
        start = p & ~4095
        libc.madvise(start, (p + (64 << 20) - start + 4095) & ~4095, 14)
    ctypes.memset(p, 1, 64 << 20); libc.free(p)
touch_cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch_cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    applied, tuned = _run(None, code)
    assert applied == "True"
    applied, plain = _run("0", code)
    assert applied == "False"
    print(f"page faults over 5 cycles (huge_pages={huge_pages}): {tuned} with the settings, {plain} without")
    assert int(plain) >= 5 * (64 // 2), plain  # fresh pages each cycle, whatever the page size (<= 2 MiB)
    assert int(tuned) * 20 <= int(plain), (tuned, plain)


def test_libtpu_without_tpu_chips_is_no_accelerator(monkeypatch):
    """The `tpu` extra installs libtpu on CPU machines (compile-only pod checks): that alone is no accelerator,
    the CPU settings stay, and the command lines keep JAX off the absent TPU."""
    from dit_jax.utils import platforms

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(platforms, "libtpu_installed", lambda: True)
    monkeypatch.setattr(platforms, "gpu_plugin_installed", lambda: False)
    monkeypatch.setattr(platforms, "tpu_hardware_present", lambda: False)
    assert not platforms.accelerator_plugin_installed()
    assert platforms.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(platforms, "tpu_hardware_present", lambda: True)
    assert platforms.accelerator_plugin_installed() and not platforms.skip_absent_tpu()
    assert "JAX_PLATFORMS" not in os.environ


LIBTPU_NOISE = ("TPU accelerator type", "TPU_WORKER_HOSTNAMES", "libtpu")


def test_a_command_line_on_this_cpu_machine_never_starts_libtpu():
    """A command line imports JAX first and calls skip_absent_tpu() (run_command) after: JAX had read
    JAX_PLATFORMS at import, so the variable alone came too late and every start printed libtpu's failed TPU
    initialisation (and spent a second on it). Same order here, in a process without JAX_PLATFORMS."""
    from dit_jax.utils import platforms

    assert platforms.libtpu_installed() and not platforms.tpu_hardware_present()  # the test environment's premise
    code = ("import jax\n"
            "from dit_jax.cli.common import run_command\n"
            "run_command('probe', lambda: print(jax.devices()[0].platform))\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stdout + r.stderr[-2000:]
    assert not [w for w in LIBTPU_NOISE if w in r.stderr], r.stderr[-2000:]
