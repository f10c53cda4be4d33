"""dit_jax.utils.xla_cpu: dit_jax's own CPU programs compile without YNNPACK fusions; users' programs do not change.

Why (measured, see the module docstring): with XLA's default YNNPACK convolutions the FID Inception forward
is ~1.4x slower on this CPU, and YNNPACK's float32 dots put DiT up to 2.4x further from float64 than the
release (tests/test_model_precision.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.utils import xla_cpu


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


X = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)
W = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)


def _hlo(fn):
    return fn.lower(X, W).compile().as_text()


def test_options_on_cpu_only(monkeypatch):
    assert xla_cpu.compiler_options("cpu") == {xla_cpu.OPTION: ""}  # this jaxlib (0.10) knows the option
    assert xla_cpu.compiler_options("tpu") is None  # e.g. --compile-only for a pod: libtpu's compiler
    monkeypatch.setenv("DIT_JAX_CPU_YNNPACK", "1")
    assert xla_cpu.compiler_options("cpu") is None
    monkeypatch.delenv("DIT_JAX_CPU_YNNPACK")
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.OPTION}=LIBRARY_FUSION_TYPE_DOT")  # the user's own choice wins
    assert xla_cpu.compiler_options("cpu") is None


def test_programs_have_no_ynnpack_fusion():
    """XLA's default puts this convolution into a YNNPACK fusion; dit_jax's jit does not (if this jaxlib's
    default stops doing so, the first assertion says the option has become pointless)."""
    assert "ynn_fusion" in _hlo(jax.jit(_conv)), "XLA no longer uses YNNPACK here by default: revisit xla_cpu"
    assert "ynn_fusion" not in _hlo(xla_cpu.jit(_conv))


def test_same_values_and_usable_inside_a_trace():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(X.shape), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(W.shape), jnp.float32)
    ours = xla_cpu.jit(_conv)
    np.testing.assert_allclose(ours(x, w), jax.jit(_conv)(x, w), rtol=1e-5, atol=1e-4)
    # inside a caller's jit it is the plain jitted function (compiler options are for top-level jits only)
    outer = jax.jit(lambda x, w: ours(x, w) * 2.0)
    np.testing.assert_allclose(outer(x, w), 2.0 * np.asarray(ours(x, w)), rtol=1e-5, atol=1e-4)


def test_static_jit_decorator():
    @xla_cpu.static_jit(static_argnums=0)
    def scaled(k, x):
        return x * k

    assert float(scaled(3, jnp.float32(2.0))) == 6.0


@pytest.mark.slow
def test_feature_extractor_uses_it():
    from dit_jax.evaluation.features import _compiled

    fn = _compiled(tuple(jax.devices()), "float32", True)
    from dit_jax.evaluation.inception import init_params, inception_forward

    params = jax.tree_util.tree_map(jnp.asarray, init_params(0))
    images = jax.ShapeDtypeStruct((jax.device_count(), 32, 32, 3), jnp.uint8)
    assert "ynn_fusion" not in fn.lower(params, images).compile().as_text()
    assert "ynn_fusion" in jax.jit(lambda p, x: inception_forward(p, x)["pool"]).lower(params, images).compile().as_text()


def test_train_step_compiled_with_it(monkeypatch):
    """jit_train_step passes the options for the mesh's platform (CPU here; none for a TPU topology)."""
    from conftest import tiny_config
    from dit_jax import train

    config = tiny_config()
    s = train.setup(config)
    seen = {}
    real_jit = jax.jit

    def spy(fun, **kwargs):
        seen.update(kwargs)
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(train.jax, "jit", spy)
    train.jit_train_step(config, s)
    assert seen["compiler_options"] == {xla_cpu.OPTION: ""}
