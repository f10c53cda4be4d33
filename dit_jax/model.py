"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax linen.

Mirrors the PyTorch release layer for layer so weights convert one-to-one (see convert/). The JAX side
works in NHWC: inputs (N, H, W, C), outputs (N, H, W, out_channels).

The numerical kernels (sin-cos tables, timestep features, LayerNorm, attention with its backward) live in
dit_jax/nn/model_ops.py; this file holds the modules and the size registry. Parameter names follow the
release's state_dict keys (`t_embedder/mlp_0` <-> `t_embedder.mlp.0`), so the converter's rename table stays
one line per family; the blocks' parameters are stacked along a leading depth axis (`blocks/attn/qkv/kernel`
is (depth, D, 3D); block i is `blocks.i.attn.qkv` in the release, see dit_jax/nn/param_layout.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.nn import attention
from dit_jax.nn import remat as remat_lib
from dit_jax.nn.model_ops import (chunked_dot_general, get_2d_sincos_pos_embed, layer_norm, modulate, timestep_embedding,
                               token_dot_general)
from dit_jax.nn.remat import checkpoint_name

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
    "cudnn" or "pallas_tpu"; see dit_jax/nn/attention.py.
    recompute_probs: with the "matmul" kernel, the backward pass recomputes the probabilities from q, k and
    their rows' log-sum-exp instead of keeping them (model_ops.recomputing_attention); DiT sets it for every
    remat policy but "none". The other kernels keep no probabilities anyway.
    """

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = "auto"
    precise_cpu_dots: bool = False  # see DiT
    recompute_probs: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        head_dim = d // self.num_heads
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=xavier,
                                  bias_init=zeros, dot_general=token_dot_general(self.precise_cpu_dots))
        qkv = checkpoint_name(dense(3 * d, name="qkv")(x), remat_lib.QKV)
        qkv = qkv.reshape(n, t, 3, self.num_heads, head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (N, T, H, Dh)
        # (N, T, H, Dh), named remat_lib.ATTN_OUT for the policies
        out = attention.dot_product_attention(q, k, v, self.attention_impl, recompute_probs=self.recompute_probs)
        return checkpoint_name(dense(d, name="proj")(out.reshape(n, t, d)), remat_lib.PROJ)


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
        x = checkpoint_name(dense(self.mlp_hidden, name="fc1")(x), remat_lib.FC1)
        x = nn.gelu(x, approximate=True)  # tanh approximation, as in the release
        return checkpoint_name(dense(self.hidden_size, name="fc2")(x), remat_lib.FC2)


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
    recompute_probs: bool = False  # see Attention

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        # x: (N, T, D) float32 residual stream; c: (N, D) float32 conditioning.
        d = self.hidden_size
        mod = nn.Dense(6 * d, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=zeros, bias_init=zeros,
                       dot_general=chunked_dot_general, name="adaLN_modulation_1")(nn.silu(c)).astype(jnp.float32)
        mod = checkpoint_name(mod, remat_lib.ADALN)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(layer_norm(x), shift_msa, scale_msa).astype(self.dtype)
        h = Attention(d, self.num_heads, self.dtype, self.param_dtype, self.attention_impl, self.precise_cpu_dots,
                      self.recompute_probs, name="attn")(h)
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
    # What the backward pass keeps of each block (dit_jax/nn/remat.py): "none" (everything autodiff needs),
    # "full" (only the block's input), or a selective policy such as "save_dots" (the matmul outputs in the
    # compute dtype; norms, modulation, GELU and softmax recomputed). Only differentiated programs change.
    remat_policy: str = "none"
    remat: bool = False  # the older name of remat_policy="full" (True), kept as an alias
    # Run the blocks as one `lax.scan` over their stacked parameters (`blocks`, (depth, ...) arrays, sliced in
    # place): a 2x faster backward on CPU (see docs/performance.md) and a compile time that does not grow with
    # depth. True (default): every program, so any differentiated one, whatever `train` says (train only
    # switches label dropout). False: a Python loop over the blocks, each reading its slice of the stacked
    # parameters; the samplers (diffusion.dit_model_fn) use it for their forward (docs/performance.md).
    scan_blocks: bool = True
    # "auto": per platform when traced (CPU head-major matmuls, GPU cuDNN flash attention, TPU Pallas flash
    # attention from 1024 tokens, else XLA's); "matmul" (None too), "xla", "cudnn", "pallas_tpu": that
    # kernel everywhere. dit_jax/nn/attention.py.
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
        remat_lib.resolve(self.remat_policy, self.remat)  # an unknown name fails here, before any compute
        # Creates the blocks' parameters at init, stacked along a leading depth axis (one vmapped DiTBlock);
        # every call then reads them (`_run_blocks`), so the block module itself is never called again.
        self.blocks = nn.vmap(DiTBlock, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                              axis_size=self.depth)(**self._block_kwargs(), name="blocks")
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels, **kw)

    def pos_embed(self) -> np.ndarray:
        """(T, D) fixed sin-cos table; a constant, not a parameter (the release never trains it)."""
        return get_2d_sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)

    def block(self) -> DiTBlock:
        """An unbound DiTBlock as the blocks of this DiT run it (apply it to one block's parameters)."""
        return DiTBlock(**self._block_kwargs(), parent=None)

    def _block_kwargs(self) -> dict:
        return dict(hidden_size=self.hidden_size, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                    mlp_norm_eps=self.mlp_norm_eps, precise_cpu_dots=self.precise_cpu_dots,
                    recompute_probs=remat_lib.resolve(self.remat_policy, self.remat) != "none")

    def _run_blocks(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """The blocks on h (N, T, D) float32 with conditioning c (N, D) -> (N, T, D), from the stacked params.

        Why a `lax.scan` (scan_blocks=True): unrolled, XLA's CPU fusion recomputes the residual-stream
        gradient, a chain of elementwise adds over all later blocks, inside every consumer of it, so the
        backward pass costs O(depth^2) elementwise work (2/3 of a DiT-S/2 training step). A loop body is a
        fusion boundary: each block's gradient is materialised once. The scan slices the stacked parameters
        in place and writes each block's gradient into its slice of the stacked gradient: no copy of either.
        """
        if self.is_initializing():
            self.blocks(h, c)  # creates the stacked parameters; its (depth, N, T, D) output is not used
        stacked = self.variables["params"]["blocks"]  # arrays (depth, ...)
        block = self.block()
        policy = remat_lib.resolve(self.remat_policy, self.remat)
        if self.scan_blocks:
            h, _ = jax.lax.scan(block_step(block, c, policy, prevent_cse=False), h, stacked)
            return h
        step = block_step(block, c, policy)
        for i in range(self.depth):
            h, _ = step(h, jax.tree_util.tree_map(lambda p: p[i], stacked))
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
        h = self._run_blocks(h, c)
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


def block_step(block: DiTBlock, c: jax.Array, policy: str, prevent_cse: bool = True) -> Callable:
    """One block as a scan body, `(h (N, T, D), one block's params) -> (h, None)`, under the remat policy
    (dit_jax/nn/remat.py); c (N, D) is the conditioning, the same for every block."""
    low = jnp.dtype(block.dtype)
    # ("none" keeps each block's compute-dtype weights for the backward pass anyway.)
    rounded = policy != "none" and low != jnp.dtype(block.param_dtype) and jnp.issubdtype(low, jnp.floating)

    def step(h, params):
        if rounded:
            # Rounds this block's parameters to the compute dtype's precision (in their own dtype; the layers'
            # cast that follows is then exact, and so are the gradients: their cotangents come from
            # compute-dtype matmuls already). Why: XLA (TPU) moves a plain cast of a slice of the stacked
            # parameters before the slice and out of the loop, i.e. casts all of them once, a compute-dtype
            # copy of every block (1.26 GiB for DiT-XL/2) that lives through the forward and backward passes.
            # An optimization barrier does not stop it (XLA removes barriers first); this does.
            fi = jnp.finfo(low)
            params = jax.tree_util.tree_map(lambda p: jax.lax.reduce_precision(p, fi.nexp, fi.nmant), params)
        return block.apply({"params": params}, h, c), None

    return remat_lib.checkpoint_block(step, policy, prevent_cse)


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
