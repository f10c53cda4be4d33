"""The three batch kinds of the data contract: ready "x", pre-extracted latents, images through the VAE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_vae
from dit_jax import train
from dit_jax.training import build
from dit_jax.training.state import init_state
from dit_jax.training.step import make_loss_fn, make_train_step
from dit_jax.utils.errors import ConfigError
from dit_jax.vae import AutoencoderKL


@pytest.mark.slow
def test_image_batches_equal_their_latent_posteriors():
    """An "image" batch encoded in the step gives the same loss as the "latent_mean"/"latent_std" batch
    holding that image's posterior (same rng), and both use the 0.18215 scale."""
    c = tiny_config(global_batch_size=4)
    c.mesh.num_devices = 1
    c.model.patch_size, c.model.input_size, c.model.in_channels, c.model.num_classes = 2, 4, 4, 10
    c.data.name = "latents"  # not digits: 4-channel latents
    env = train.setup(c)
    model, tx = env.model, env.tx
    vae, vae_params = tiny_vae()  # params drawn with NumPy: no init compile; conv weights fit any image size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32))  # (N, H, W, 3)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))  # one compile, not per op
    mean, logvar = encode(vae_params, images)  # (N, 4, 4, 4)
    y = jnp.asarray([0, 1, 2, 3], jnp.int32)
    st = init_state(model, tx, jax.random.PRNGKey(0), env.state_shardings)
    loss_fn = make_loss_fn(model, env.diffusion, c.latent_scale, vae)
    step = jax.jit(make_train_step(loss_fn, tx, build.lr_schedule(c), c.ema_decay))
    key = jax.random.PRNGKey(7)
    copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)  # noqa: E731
    _, m_img = step(copy(st), {"image": images, "y": y}, key, vae_params)
    _, m_lat = step(copy(st), {"latent_mean": mean, "latent_std": jnp.exp(0.5 * logvar), "y": y}, key, None)
    assert abs(float(m_img["loss"]) - float(m_lat["loss"])) <= 1e-5 * abs(float(m_lat["loss"]))
    # Scaling: feeding the scaled posterior mean as "x" with std 0 equals the latent kind with std 0.
    _, m_x = step(copy(st), {"x": mean * 0.18215, "y": y}, key, None)
    _, m_l0 = step(copy(st), {"latent_mean": mean, "latent_std": jnp.zeros_like(mean), "y": y}, key, None)
    assert abs(float(m_x["loss"]) - float(m_l0["loss"])) <= 1e-5 * abs(float(m_x["loss"]))


def test_check_batch_names_shape_and_label_mismatch():
    c = tiny_config()
    model = build.build_model(c)
    with pytest.raises(ConfigError, match=r"kind 'x' has per-example shape \(16, 16, 1\).*needs \(8, 8, 1\)"):
        build.check_batch({"x": np.zeros((2, 16, 16, 1)), "y": np.zeros(2, np.int32)}, model, 2)
    with pytest.raises(ConfigError, match=r"labels span 0..10 but config.model.num_classes=10"):
        build.check_batch({"x": np.zeros((2, 8, 8, 1)), "y": np.array([0, 10], np.int32)}, model, 2)
