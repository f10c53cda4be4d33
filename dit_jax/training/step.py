"""The pure training step: diffusion loss, gradients (optionally accumulated over micro-batches), optax update
and EMA. `make_train_step(...)` returns `train_step(state, batch, rng, vae_params) -> (state, metrics)`, which
dit_jax.train jits with the state's shardings and donates the old state to.

Randomness: the step's key is fold_in(rng, state.step), split into the latent draw, the timesteps, the
noise and the label dropout; micro-batch i uses fold_in(step key, i). A resumed run therefore draws the same
numbers as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from dit_jax.diffusion import GaussianDiffusion
from dit_jax.model import DiT
from dit_jax.training.state import TrainState
from dit_jax.utils.images import to_model_range
from dit_jax.vae import AutoencoderKL

Batch = Dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array, Any], Tuple[jax.Array, Dict[str, jax.Array]]]
TERMS = ("loss", "mse", "vb")


def float_pixels(pixels: jax.Array) -> jax.Array:
    """uint8 0..255 -> float32 [-1, 1]; float pixels (already in [-1, 1]) -> float32."""
    return to_model_range(pixels) if pixels.dtype == jnp.uint8 else pixels.astype(jnp.float32)


def model_input(batch: Batch, rng: jax.Array, vae: Optional[AutoencoderKL], vae_params: Any,
                latent_scale: float) -> jax.Array:
    """A batch of any kind -> the diffusion input x_start (n, S, S, C) float32.

    Pixels from the image sources arrive as uint8 (a quarter of float32's bytes host -> device) and are
    scaled to [-1, 1] here; float pixels (the digits, a caller's arrays) are taken as already in [-1, 1]."""
    if "x" in batch:
        return float_pixels(batch["x"])
    if "latent_mean" in batch:  # pre-extracted posterior: sample it with this step's rng
        eps = jax.random.normal(rng, batch["latent_mean"].shape, jnp.float32)
        return (batch["latent_mean"] + batch["latent_std"] * eps) * latent_scale
    images = float_pixels(batch["image"])  # (n, S, S, 3) float32 in [-1, 1]
    mean, logvar = vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return jax.lax.stop_gradient((mean + jnp.exp(0.5 * logvar) * eps) * latent_scale)


def make_loss_fn(model: DiT, diffusion: GaussianDiffusion, latent_scale: float,
                 vae: Optional[AutoencoderKL] = None) -> LossFn:
    """loss_fn(params, batch, rng, vae_params) -> (mean loss, {"loss", "mse", "vb"} batch means)."""
    num_t = int(diffusion.num_timesteps)

    def loss_fn(params, batch, rng, vae_params):
        r_lat, r_t, r_noise, r_drop = jax.random.split(rng, 4)
        x = model_input(batch, r_lat, vae, vae_params, latent_scale)  # (n, S, S, C)
        t = jax.random.randint(r_t, (x.shape[0],), 0, num_t)
        noise = jax.random.normal(r_noise, x.shape, jnp.float32)

        def model_fn(xt, tt):
            return model.apply({"params": params}, xt, tt, batch["y"], train=True, rngs={"dropout": r_drop})

        terms = diffusion.training_losses(model_fn, x, t, noise=noise)
        return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

    return loss_fn


def accumulated_grads(grad_fn, params, batch: Batch, rng: jax.Array, vae_params, accum: int):
    """Mean gradient and loss terms over `accum` micro-batches, one `lax.scan` step each.

    Micro-batch i takes rows i, i+A, i+2A, ... so every device holds an equal share of it.
    """
    mbs = jax.tree_util.tree_map(lambda a: a.reshape((a.shape[0] // accum, accum) + a.shape[1:]).swapaxes(0, 1),
                                 batch)

    def body(carry, xs):
        g_sum, t_sum = carry
        i, mb = xs
        (_, terms), g = grad_fn(params, mb, jax.random.fold_in(rng, i), vae_params)
        return (jax.tree_util.tree_map(jnp.add, g_sum, g), jax.tree_util.tree_map(jnp.add, t_sum, terms)), None

    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), {k: jnp.zeros((), jnp.float32) for k in TERMS})
    (g_sum, t_sum), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), mbs))
    return jax.tree_util.tree_map(lambda g: g / accum, g_sum), {k: v / accum for k, v in t_sum.items()}


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, lr: optax.Schedule, ema_decay: float,
                    grad_accum_steps: int = 1):
    """train_step(state, batch, rng, vae_params) -> (new state, metrics: loss terms, grad_norm, lr)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    decay = float(ema_decay)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array, vae_params) -> Tuple[TrainState, Dict]:
        step_rng = jax.random.fold_in(rng, state.step)
        if grad_accum_steps == 1:
            (_, terms), grads = grad_fn(state.params, batch, step_rng, vae_params)
        else:
            grads, terms = accumulated_grads(grad_fn, state.params, batch, step_rng, vae_params, grad_accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, dict(terms, grad_norm=optax.global_norm(grads), lr=lr(state.step))

    return train_step
