"""Sampling images from a DiT: per-image keys, the jittable sampling loop, VAE decoding to uint8.

The library behind `dit-jax-sample` and `dit-jax-sample-many` (dit_jax/cli/). Image i of a run is seeded by
fold_in(PRNGKey(seed), i): its starting noise, its per-step noise and (for random labels) its class come
from that key alone, so a sample does not depend on the batch size, the devices or the hosts.

    fn = jax.jit(latents_fn(model, sampling_diffusion(model, "250"), "ddpm", cfg_scale=4.0))
    latents = fn(params, labels, image_keys(seed, range(n)))                 # (N, h, w, 4)
    images = jax.jit(images_fn(vae))(vae_params, latents)                    # uint8 (N, H, W, 3)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import GaussianDiffusion, create_diffusion
from dit_jax.guidance import dit_model_fn
from dit_jax.model import DiT
from dit_jax.utils.images import to_uint8
from dit_jax.vae import AutoencoderKL

RELEASE_CLASS_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # the release sample.py's default classes
SAMPLERS = ("ddpm", "ddim")


def sampling_diffusion(model: DiT, respacing: str) -> GaussianDiffusion:
    """The release's sampling diffusion; fixed (large) variance when the model does not learn sigma."""
    return create_diffusion(respacing, learn_sigma=bool(model.learn_sigma))


def image_keys(seed: int, indices) -> jax.Array:
    """One key per image index: fold_in(PRNGKey(seed), index) -> (N, 2) raw keys."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def image_labels(seed: int, indices, num_classes: int, mode: str) -> np.ndarray:
    """Class label of each image index (int32): "balanced" = index % num_classes, "random" = drawn from its key."""
    indices = np.asarray(indices, np.int64)
    if mode == "balanced":
        return (indices % num_classes).astype(np.int32)
    keys = image_keys(seed, indices)
    draw = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, num_classes))
    return np.asarray(draw(keys), np.int32)


def latents_fn(model: DiT, diffusion: GaussianDiffusion, sampler: str = "ddpm", cfg_scale: float = 1.0,
               eta: float = 0.0, guidance_channels: Optional[int] = 3, progress: bool = False,
               batch_chunk: Any = "auto") -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """fn(params, labels (N,), keys (N, 2)) -> latents (N, h, w, C); pure, so jit it (or shard_map it).

    Image i starts from x_T = normal(fold_in(keys[i], 0)) and its per-step noise comes from
    fold_in(keys[i], 1): nothing depends on the other images in the batch.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {SAMPLERS}")
    shape1 = (model.input_size, model.input_size, model.in_channels)

    def fn(params, labels, keys):
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape1))(keys)  # (N, h, w, C)
        loop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        model_fn = dit_model_fn(model, params, labels, cfg_scale, guidance_channels, batch_chunk)
        shape = (labels.shape[0],) + shape1
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, shape, loop_keys, noise=x_T, progress=progress)
        return diffusion.ddim_sample_loop(model_fn, shape, loop_keys, noise=x_T, eta=eta, progress=progress)

    return fn


def images_fn(vae: Optional[AutoencoderKL]) -> Callable[[Any, jax.Array], jax.Array]:
    """fn(vae_params, latents) -> uint8 images (N, H, W, 3); with vae None a preview of latent channels 0-2."""
    if vae is None:
        def preview(_, latents):
            # Raw latents are roughly N(0, 1): map [-3, 3] to [0, 255] (a picture of the latents, not an image).
            return to_uint8(jnp.clip(latents[..., :3] / 3.0, -1.0, 1.0))
        return preview

    def decode(vae_params, latents):
        images = vae.apply({"params": vae_params}, latents / vae.scaling_factor, method=AutoencoderKL.decode)
        return to_uint8(images)  # clamp to [-1, 1] and round like torchvision's save_image

    return decode
