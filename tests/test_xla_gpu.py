"""dit_jax/utils/xla_gpu.py: the XLA:GPU options dit_jax's GPU programs get, and the candidates gpu.sh sweeps."""
import jax
import jax.numpy as jnp
import pytest

from dit_jax.utils import xla_cpu, xla_gpu


@pytest.mark.parametrize("name", sorted(xla_gpu.CANDIDATES))
def test_candidate_options_exist_in_this_xla(name):
    """XLA refuses an unknown compile option ("No such compile option"), so each candidate compiles only if its
    names exist (GPU options are part of XLA's common DebugOptions, so a CPU compile checks them)."""
    f = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((2,), jnp.float32))
    f.compile(xla_gpu.CANDIDATES[name])
    with pytest.raises(Exception, match="No such compile option"):
        f.compile({"xla_gpu_no_such_option_here": True})


def test_gpu_programs_get_the_gpu_options(monkeypatch):
    monkeypatch.delenv(xla_gpu.ENV, raising=False)
    assert xla_gpu.OPTIONS == {} and xla_cpu.compiler_options("gpu") is None  # XLA's defaults until a GPU run
    monkeypatch.setattr(xla_gpu, "OPTIONS", {"xla_gpu_enable_cudnn_layer_norm": True})
    assert xla_cpu.compiler_options("gpu") == {"xla_gpu_enable_cudnn_layer_norm": True}
    assert xla_cpu.compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_cudnn_layer_norm=false")  # the user's flag wins
    assert xla_cpu.compiler_options("gpu") is None


def test_environment_replaces_the_options(monkeypatch):
    monkeypatch.setenv(xla_gpu.ENV, "xla_gpu_enable_triton_gemm=false, xla_gpu_autotune_level=0,"
                                    "xla_gpu_enable_command_buffer=")
    assert xla_gpu.compiler_options() == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0,
                                          "xla_gpu_enable_command_buffer": ""}
    monkeypatch.setenv(xla_gpu.ENV, "triton=false")
    with pytest.raises(ValueError, match="'triton=false' is not name=value with an xla_ option name"):
        xla_gpu.compiler_options()
