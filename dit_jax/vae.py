"""The Stable Diffusion VAE (`AutoencoderKL`, sd-vae-ft-mse / sd-vae-ft-ema) in Flax linen, NHWC.

DiT trains and samples in the latent space of this autoencoder: images (N, H, W, 3) in [-1, 1] map to
latents (N, H/8, W/8, 4), scaled by LATENT_SCALE = 0.18215 before the diffusion model sees them.

    from dit_jax.vae import AutoencoderKL, LATENT_SCALE
    from dit_jax.vae_weights import load_vae
    vae, params = load_vae("mse")                                   # or "ema", or a diffusers folder / .safetensors
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    images = vae.apply({"params": params}, latents / LATENT_SCALE, method=AutoencoderKL.decode)

Parameter names follow the diffusers state_dict (`encoder/down_blocks_0/resnets_1/norm2` <->
`encoder.down_blocks.0.resnets.1.norm2`), so dit_jax/vae_weights.py maps keys one-to-one.
No torch/diffusers import here: the GPU box has neither.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.utils import xla_cpu

Dtype = Any

LATENT_SCALE = 0.18215  # sd-vae-ft-* `scaling_factor`: diffusion latents are `sample * LATENT_SCALE`
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of the posterior log-variance used by the reference VAE
GROUP_NORM_EPS = 1e-6  # every GroupNorm of the reference VAE (fixed in diffusers, not a config field)


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis, statistics always in float32; params `scale`, `bias` (C,)."""

    num_groups: int = 32
    epsilon: float = GROUP_NORM_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C) -> same
        n, h, w, c = x.shape
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(n, h, w, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)  # two-pass: no cancellation
        xg = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = xg.reshape(n, h, w, c) * scale + bias
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, padding: Any = None) -> nn.Conv:
    """A conv with 'same' zero padding for odd kernels unless `padding` is given (params stay float32)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """norm1-SiLU-conv1-norm2-SiLU-conv2 plus the (1x1 conv when widths differ) shortcut; no time embedding."""

    out_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, Cin) -> (N, H, W, Cout)
        h = nn.silu(GroupNorm(self.num_groups, GROUP_NORM_EPS, self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(GroupNorm(self.num_groups, GROUP_NORM_EPS, self.dtype, name="norm2")(h))
        # Dropout is 0 in the sd-vae configuration and the VAE is never trained here.
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a GroupNorm in front and a residual."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C) -> same
        n, hh, ww, c = x.shape
        h = GroupNorm(self.num_groups, GROUP_NORM_EPS, self.dtype, name="group_norm")(x)
        h = h.reshape(n, hh * ww, c)  # (N, T, C)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(h)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(h)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(h)
        # (N, T, 1 head, C); the XLA path computes logits and softmax in float32 for low-precision inputs.
        o = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0 / math.sqrt(c))
        o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(o.reshape(n, hh * ww, c))
        return x.astype(self.dtype) + o.reshape(n, hh, ww, c)


class MidBlock(nn.Module):
    """resnet - attention - resnet at the lowest resolution (attention optional, as in the config)."""

    channels: int
    num_groups: int = 32
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.channels, self.num_groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.num_groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only (asymmetric)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C) -> (N, H/2, W/2, C)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (N, H, W, C) -> (N, 2H, 2W, C)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class LevelBlock(nn.Module):
    """One resolution level: `num_layers` resnets, then an optional "down"sampler or "up"sampler."""

    channels: int
    num_layers: int
    resample: Optional[str] = None  # None | "down" | "up"
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.num_groups, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.channels, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images (N, H, W, in) -> moments (N, H/2^(L-1), W/2^(L-1), 2*latent) before quant_conv."""

    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = tuple(self.block_out_channels)
        x = _conv(chans[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, c in enumerate(chans):
            x = LevelBlock(c, self.layers_per_block, "down" if i < len(chans) - 1 else None, self.num_groups,
                           self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], self.num_groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(GroupNorm(self.num_groups, GROUP_NORM_EPS, self.dtype, name="conv_norm_out")(x))
        return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (N, h, w, latent) after post_quant_conv -> images (N, h*2^(L-1), w*2^(L-1), out)."""

    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans = tuple(reversed(tuple(self.block_out_channels)))
        x = _conv(chans[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(chans[0], self.num_groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, c in enumerate(chans):  # the decoder has one resnet more per level than the encoder
            x = LevelBlock(c, self.layers_per_block + 1, "up" if i < len(chans) - 1 else None, self.num_groups,
                           self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(self.num_groups, GROUP_NORM_EPS, self.dtype, name="conv_norm_out")(x))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Stable Diffusion; defaults are the sd-vae-ft-mse/-ema configuration.

    `encode(images)` -> (mean, logvar) of the latent posterior; `decode(latents)` -> images.
    Both work on unscaled latents: multiply by `scaling_factor` (LATENT_SCALE) for DiT, divide before decoding.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = LATENT_SCALE
    dtype: Dtype = jnp.float32  # compute dtype; params stay float32, norms and softmax run in float32

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """(N, H, W, 3) in [-1, 1] -> mean, logvar, each (N, H/8, W/8, latent) float32 (logvar clamped)."""
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"encode expects NHWC images with {self.in_channels} channels, got shape {images.shape}")
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (N, h, w, latent) -> images (N, 8h, 8w, 3) float32, roughly in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"decode expects NHWC latents with {self.latent_channels} channels, "
                             f"got shape {latents.shape}")
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction (used by `init`): encode, sample (or take the mean when rng is None), decode."""
        mean, logvar = self.encode(images)
        z = mean if rng is None else sample_latent(rng, mean, logvar)
        return self.decode(z)


# ----------------------------------------------------------------------------------------------------
# Helpers for the diffusion side: latents here are SCALED (what DiT sees)
# ----------------------------------------------------------------------------------------------------
def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * eps."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


@xla_cpu.static_jit(static_argnums=0)
def _encode_scaled(vae: AutoencoderKL, params, images, rng):
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean if rng is None else sample_latent(rng, mean, logvar)
    return z * vae.scaling_factor


@xla_cpu.static_jit(static_argnums=0)
def _decode_scaled(vae: AutoencoderKL, params, latents):
    return vae.apply({"params": params}, latents / vae.scaling_factor, method=AutoencoderKL.decode)


def encode_to_latents(vae: AutoencoderKL, params, images: jax.Array, rng: Optional[jax.Array]) -> jax.Array:
    """Images (N, H, W, 3) in [-1, 1] -> scaled latents `sample * 0.18215` (N, H/8, W/8, 4), jitted.

    `rng=None` uses the posterior mean instead of a sample.
    """
    return _encode_scaled(vae, params, images, rng)


def decode_latents(vae: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
    """Scaled latents (N, h, w, 4) -> images (N, 8h, 8w, 3) float32 (unclipped, roughly [-1, 1]), jitted."""
    return _decode_scaled(vae, params, latents)
