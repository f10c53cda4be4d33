"""Image batches travel as uint8 (a quarter of float32's bytes host -> device); the step scales them to [-1, 1]."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_vae
from dit_jax.training import build
from dit_jax.training.step import model_input
from dit_jax.utils.errors import ConfigError
from dit_jax.utils.images import to_model_range


def test_step_scales_uint8_like_the_host_did():
    vae, params = tiny_vae()
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    key = jax.random.PRNGKey(5)
    f = jax.jit(lambda b: model_input(b, key, vae, params, 0.18215))
    from_uint8 = f({"image": jnp.asarray(pixels)})
    from_float = f({"image": jnp.asarray(to_model_range(pixels))})  # what the host sent before
    # XLA may compute x / 127.5 as x * (1 / 127.5): the scaled pixels agree to one ulp of 1.0 (checked below),
    # which the encoder carries to ~6e-8 absolute on O(1) latents; 1e-6 is far below a wrong scaling (differences ~0.1)
    np.testing.assert_allclose(np.asarray(from_uint8), np.asarray(from_float), rtol=0, atol=1e-6)
    # "x" pixels (a pixel-space model on images) are scaled the same way; float "x" (digits) passes through
    np.testing.assert_allclose(np.asarray(f({"x": jnp.asarray(pixels)})), to_model_range(pixels), rtol=0,
                               atol=2.0**-23)
    x = np.linspace(-1, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(f({"x": jnp.asarray(x)})), x)


def test_check_batch_wants_uint8_images():
    c = tiny_config()
    c.model.update(input_size=4, in_channels=4)
    model = build.build_model(c)
    y = np.zeros(2, np.int32)
    assert build.check_batch({"image": np.zeros((2, 32, 32, 3), np.uint8), "y": y}, model, 2) == "image"
    with pytest.raises(ConfigError, match="'image' has dtype float32; image batches are uint8"):
        build.check_batch({"image": np.zeros((2, 32, 32, 3), np.float32), "y": y}, model, 2)
