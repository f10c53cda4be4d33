"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax linen.

Mirrors the PyTorch release layer for layer so weights convert one-to-one (see convert/). The JAX side
works in NHWC: inputs (N, H, W, C), outputs (N, H, W, out_channels).

The numerical kernels (sin-cos tables, timestep features, LayerNorm, attention with its backward) live in
dit_jax/model_ops.py; this file holds the modules and the size registry. Parameter names follow the
release's state_dict keys (`blocks_3/attn/qkv` <-> `blocks.3.attn.qkv`,
`t_embedder/mlp_0` <-> `t_embedder.mlp.0`), so the converter's rename table stays one line per family.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import attention
from dit_jax.model_ops import (chunked_dot_general, get_2d_sincos_pos_embed, layer_norm, modulate, timestep_embedding,
                               token_dot_general)

Dtype = Any

# Release init: xavier-uniform linears with zero bias; the patch projection is xavier over its
# flattened (C*p*q) fan-in, like `xavier_uniform_(w.view(D, -1))` in the release.
xavier = nn.initializers.xavier_uniform()
patch_xavier = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
normal_002 = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros


# ----------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as a reshape + one matmul (same maths as the strided conv).

    The kernel is stored as (p, q, C, D), i.e. torch's conv weight (D, C, p, q) transposed (2, 3, 1, 0).
    """

    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hh, ww, c = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        kernel = self.param("kernel", patch_xavier, (p, p, c, self.hidden_size), self.param_dtype)
        bias = self.param("bias", zeros, (self.hidden_size,), self.param_dtype)
        x = x.reshape(n, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)  # (N, h, w, p, q, C)
        x = x.reshape(n, h * w, p * p * c).astype(self.dtype)  # (N, T, p*q*C)
        y = jnp.dot(x, kernel.reshape(p * p * c, self.hidden_size).astype(self.dtype))
        return y + bias.astype(self.dtype)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D) through 256 sinusoid frequencies and Linear-SiLU-Linear."""

    hidden_size: int
    frequency_embedding_size: int = 256
    freq_shift: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)  # (N, 256)
        dense = functools.partial(nn.Dense, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=normal_002, bias_init=zeros, dot_general=chunked_dot_general)
        h = dense(name="mlp_0")(t_freq)
        h = nn.silu(h)
        return dense(name="mlp_2")(h).astype(jnp.float32)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). With dropout > 0 the table has a last "null" row used for guidance."""

    num_classes: int
    hidden_size: int
    dropout_prob: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, train: bool, force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        use_cfg_embedding = int(self.dropout_prob > 0)
        table = nn.Embed(self.num_classes + use_cfg_embedding, self.hidden_size, embedding_init=normal_002,
                         param_dtype=self.param_dtype, name="embedding_table")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                # Class dropout for classifier-free guidance: needs an rng only when training.
                drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = jnp.where(drop, self.num_classes, labels)
        return table(labels).astype(jnp.float32)  # (N, D)


# ----------------------------------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (with bias), like timm's Attention.

    attention_impl: "auto" (default: chosen per platform when traced), "matmul" (None/"" too), "xla",
    "cudnn" or "pallas_tpu"; see dit_jax/attention.py.
    """

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = "auto"
    precise_cpu_dots: bool = False  # see DiT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        head_dim = d // self.num_heads
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=xavier,
                                  bias_init=zeros, dot_general=token_dot_general(self.precise_cpu_dots))
        qkv = dense(3 * d, name="qkv")(x).reshape(n, t, 3, self.num_heads, head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (N, T, H, Dh)
        out = attention.dot_product_attention(q, k, v, self.attention_impl)  # (N, T, H, Dh)
        return dense(d, name="proj")(out.reshape(n, t, d))


class Mlp(nn.Module):
    hidden_size: int
    mlp_hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precise_cpu_dots: bool = False  # see DiT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=xavier,
                                  bias_init=zeros, dot_general=token_dot_general(self.precise_cpu_dots))
        x = dense(self.mlp_hidden, name="fc1")(x)
        x = nn.gelu(x, approximate=True)  # tanh approximation, as in the release
        return dense(self.hidden_size, name="fc2")(x)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * f(modulate(LN(x), shift, scale)) for attention then the MLP."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = "auto"
    mlp_norm_eps: float = 1e-6
    precise_cpu_dots: bool = False  # see DiT

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        # x: (N, T, D) float32 residual stream; c: (N, D) float32 conditioning.
        d = self.hidden_size
        mod = nn.Dense(6 * d, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=zeros, bias_init=zeros,
                       dot_general=chunked_dot_general, name="adaLN_modulation_1")(nn.silu(c)).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(layer_norm(x), shift_msa, scale_msa).astype(self.dtype)
        h = Attention(d, self.num_heads, self.dtype, self.param_dtype, self.attention_impl, self.precise_cpu_dots,
                      name="attn")(h)
        x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
        h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp).astype(self.dtype)
        h = Mlp(d, int(d * self.mlp_ratio), self.dtype, self.param_dtype, self.precise_cpu_dots, name="mlp")(h)
        return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class FinalLayer(nn.Module):
    """adaLN modulation, then the linear map to patches. That dot's rounding lands on the output unattenuated,
    and it has few outputs per token (p*q*C_out <= 512), so on CPU it is always summed over short slices
    (chunked_dot_general): ~1 ms more per DiT-XL/2 forward of 8 (11 s). With XLA's Eigen dot there, DiT-XL/2
    (2 blocks) was 1.57-1.61x the release's error at t=999 (worst of 104 t); with the slices 1.32x (issue 19)."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = nn.Dense(2 * self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=zeros,
                       bias_init=zeros, dot_general=chunked_dot_general,
                       name="adaLN_modulation_1")(nn.silu(c)).astype(jnp.float32)
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale).astype(self.dtype)
        x = nn.Dense(self.patch_size**2 * self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=zeros, bias_init=zeros, dot_general=chunked_dot_general,
                     name="linear")(x)
        return x.astype(jnp.float32)  # (N, T, p*q*C_out)


# ----------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero conditioning. NHWC in, NHWC out."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    dtype: Dtype = jnp.float32  # compute dtype of the matmuls
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass (saves activation memory)
    # Run the blocks as one `lax.scan` over their stacked parameters (names and values unchanged: each block
    # keeps its own `blocks_i` parameters): a 2x faster backward on CPU (see docs/performance.md) and a
    # compile time that does not grow with depth. True (default): every program, so any differentiated one,
    # whatever `train` says (train only switches label dropout). False: a Python loop over the blocks, a
    # few % faster for a forward alone; the samplers (diffusion.dit_model_fn) use it, they never differentiate.
    scan_blocks: bool = True
    # "auto": per platform when traced (CPU head-major matmuls, GPU cuDNN flash attention, TPU Pallas flash
    # attention from 1024 tokens, else XLA's); "matmul" (None too), "xla", "cudnn", "pallas_tpu": that
    # kernel everywhere. dit_jax/attention.py.
    attention_impl: Optional[str] = "auto"
    # Two details in which diffusers' DiTTransformer2DModel differs from the release; the converter sets
    # them when it reads a diffusers model so its outputs are reproduced exactly.
    timestep_freq_shift: float = 0.0  # diffusers: 1
    mlp_norm_eps: float = 1e-6  # diffusers: config.norm_eps (1e-5)
    # On CPU, sum every per-token dot of the blocks (qkv, proj, fc1, fc2) over <= 128-long slices of its
    # contraction, as MKL does for the release. Needed only under a plain `jax.jit` on jaxlib >= 0.9, whose
    # default YNNPACK dots sum in one long float32 accumulation (up to 1.24x the release's error at 256 px
    # since the final linear is always summed in slices, 2.55x before; docs/performance.md "Precision");
    # dit_jax's own programs compile with dit_jax.utils.xla_cpu.compiler_options() (XLA's Eigen dots, within
    # 1.32x of the release without this), which a user can pass to their jit instead. Costs 8-17% time
    # in the forward; no effect on other platforms. The conditioning dots (N rows) and the final linear (few
    # outputs) are always summed so: free.
    precise_cpu_dots: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def setup(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.x_embedder = PatchEmbed(self.patch_size, self.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(self.hidden_size, freq_shift=self.timestep_freq_shift, **kw)
        self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob,
                                        param_dtype=self.param_dtype)
        block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
        self.blocks = [
            block_cls(**self._block_kwargs(), name=f"blocks_{i}") for i in range(self.depth)
        ]
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels, **kw)

    def pos_embed(self) -> np.ndarray:
        """(T, D) fixed sin-cos table; a constant, not a parameter (the release never trains it)."""
        return get_2d_sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)

    def _block_kwargs(self) -> dict:
        return dict(hidden_size=self.hidden_size, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                    mlp_norm_eps=self.mlp_norm_eps, precise_cpu_dots=self.precise_cpu_dots)

    def _scan_blocks(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """The blocks as one `lax.scan`: h (N, T, D) float32 -> (N, T, D).

        Why: unrolled, XLA's CPU fusion recomputes the residual-stream gradient, a chain of elementwise adds
        over all later blocks, inside every consumer of it, so the backward pass costs O(depth^2)
        elementwise work (2/3 of a DiT-S/2 training step). A loop body is a fusion boundary: each block's
        gradient is materialised once. The per-block parameters are stacked here (a copy, cheap next to the
        blocks' matmuls) so the parameter tree keeps the release's layout and names.
        """
        stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *[b.variables["params"] for b in self.blocks])
        block = DiTBlock(**self._block_kwargs(), parent=None)

        def body(h, params):
            return block.apply({"params": params}, h, c), None

        if self.remat:
            body = jax.checkpoint(body)
        h, _ = jax.lax.scan(body, h, stacked)
        return h

    def unpatchify(self, x: jax.Array) -> jax.Array:
        """(N, T, p*q*C) -> (N, H, W, C); channel order inside a token is (p, q, c) like the release."""
        n = x.shape[0]
        p, c = self.patch_size, self.out_channels
        h = w = self.input_size // p
        x = x.reshape(n, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (N, h, p, w, q, C)
        return x.reshape(n, h * p, w * p, c)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False,
                 force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        """x: (N, H, W, C) latents, t: (N,) timesteps, y: (N,) int labels -> (N, H, W, out_channels)."""
        if x.shape[1] != self.input_size or x.shape[2] != self.input_size:
            raise ValueError(f"expected NHWC input of spatial size {self.input_size}, got shape {x.shape}")
        if x.shape[3] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (NHWC, last axis), got shape {x.shape}")
        h = self.x_embedder(x).astype(jnp.float32) + jnp.asarray(self.pos_embed())[None]  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, train, force_drop_ids)  # (N, D)
        if self.scan_blocks and self.depth > 1 and not self.is_initializing():
            h = self._scan_blocks(h, c)
        else:
            for block in self.blocks:
                h = block(h, c)
        h = self.final_layer(h, c)  # (N, T, p*q*C_out)
        return self.unpatchify(h)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float,
                         guidance_channels: Optional[int] = 3) -> jax.Array:
        """Classifier-free guidance over a batch whose second half holds the null labels.

        Only the first `guidance_channels` output channels are guided (3, as in the release: a known quirk
        kept for parity); `None` guides all `in_channels` eps channels. Returns (N, H, W, out_channels).
        """
        half = x[: x.shape[0] // 2]
        combined = jnp.concatenate([half, half], axis=0)
        out = self(combined, t, y, train=False)
        return apply_guidance(out, cfg_scale, self.in_channels if guidance_channels is None else guidance_channels)


def apply_guidance(out: jax.Array, cfg_scale: float, guided_channels: int) -> jax.Array:
    """out (2N, H, W, C_out), conditional half first -> the release's guided output (2N, H, W, C_out).

    The first `guided_channels` channels of both halves become uncond + s * (cond - uncond); the others
    (the learned variance) are kept as the model gave them.
    """
    eps, rest = out[..., :guided_channels], out[..., guided_channels:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = jnp.concatenate([half_eps, half_eps], axis=0)
    return jnp.concatenate([eps, rest], axis=-1)


# ----------------------------------------------------------------------------------------------------
# Size registry: the one home of the 12 sizes, their names and the compute dtypes
# ----------------------------------------------------------------------------------------------------
SIZES = {  # name -> (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}
PATCH_SIZES = (2, 4, 8)
# Heads are not visible in weight shapes; the converter reads them off the standard widths.
HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in SIZES.values()}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtypes by config/flag name


def parse_model_name(name: str) -> tuple:
    """"DiT-XL/2" -> (depth, hidden_size, num_heads, patch_size); an error lists the valid names."""
    size, _, patch = name[len("DiT-"):].partition("/") if name.startswith("DiT-") else ("", "", "")
    if size not in SIZES or patch not in tuple(str(p) for p in PATCH_SIZES):
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DiT_models)}")
    return SIZES[size] + (int(patch),)


def model_name(depth: int, hidden_size: int, num_heads: int, patch_size: int) -> Optional[str]:
    """The registry name ("DiT-XL/2") of these dimensions, or None for a size outside the 12."""
    for size, dims in SIZES.items():
        if dims == (depth, hidden_size, num_heads) and patch_size in PATCH_SIZES:
            return f"DiT-{size}/{patch_size}"
    return None


def parse_dtype(name: str) -> Dtype:
    """"float32" | "bfloat16" -> the jnp dtype; an error names the choices."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _make(size: str, patch: int) -> Callable[..., DiT]:
    depth, hidden, heads = SIZES[size]

    def factory(**kwargs) -> DiT:
        return DiT(depth=kwargs.pop("depth", depth), hidden_size=hidden, num_heads=heads, patch_size=patch,
                   **kwargs)

    factory.__name__ = f"DiT_{size}_{patch}"
    return factory


DiT_models = {f"DiT-{s}/{p}": _make(s, p) for s in SIZES for p in PATCH_SIZES}


def get_model(name: str, **kwargs) -> DiT:
    """DiT_models[name](**kwargs) with an error that lists the valid names."""
    parse_model_name(name)
    return DiT_models[name](**kwargs)


def dummy_inputs(model: DiT, batch_size: int = 1) -> tuple:
    """Zero (x (N, S, S, C), t (N,), y (N,)) of the shapes `model` takes; for init and shape tracing."""
    s, c = model.input_size, model.in_channels
    return (jnp.zeros((batch_size, s, s, c), jnp.float32), jnp.zeros((batch_size,), jnp.int32),
            jnp.zeros((batch_size,), jnp.int32))


def init_params(model: DiT, rng: jax.Array, batch_size: int = 1) -> dict:
    """Release-style random init; returns the `params` collection."""
    return model.init(rng, *dummy_inputs(model, batch_size), train=False)["params"]


def abstract_params(model: DiT) -> dict:
    """The `params` tree as ShapeDtypeStructs: shapes without compute or memory."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.PRNGKey(0))


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
