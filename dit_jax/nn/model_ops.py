"""The DiT's numerical kernels, kept apart from the Flax modules of dit_jax/model.py: the fixed sin-cos tables,
the release's float32 timestep features, dots summed over short slices on CPU, LayerNorm and
adaLN modulation in float32, and the head-major attention with its hand-written backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.nn.remat import ATTN_LSE, ATTN_OUT, ATTN_PROBS, checkpoint_name
from dit_jax.nn.timestep_frequencies import timestep_frequencies


# ----------------------------------------------------------------------------------------------------
# Fixed embeddings (computed in float64 NumPy then cast to float32, exactly like the release)
# ----------------------------------------------------------------------------------------------------
def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(pos * omega), cos(pos * omega)]."""
    assert embed_dim % 2 == 0, f"embed_dim must be even, got {embed_dim}"
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table; token order is row-major (h, w).

    The release builds `meshgrid(grid_w, grid_h)`, so the first half of the channels encodes the w
    (column) coordinate and the second half the h (row) coordinate.
    """
    assert embed_dim % 2 == 0, f"embed_dim must be even, got {embed_dim}"
    coords = np.arange(grid_size, dtype=np.float32)
    w_coord, h_coord = np.meshgrid(coords, coords)  # both (G, G), indexed [h, w]
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, w_coord)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, h_coord)
    return np.concatenate([emb_w, emb_h], axis=1).astype(np.float32)  # (G*G, D)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> jax.Array:
    """(N,) timesteps (may be fractional) -> (N, dim) float32 `cat([cos, sin])` features, the release's program.

    `freq_shift` 0 is the release; diffusers' DiT port divides by (half - 1), i.e. freq_shift 1.

    The float32 steps are the model's definition (every checkpoint learned on them), so they are kept: the
    release's float32 frequencies bit for bit (dit_jax.nn.timestep_frequencies) and each argument one float32
    product t.float() * freq. Only cos/sin are XLA's own (within 4e-8 of float64 on these arguments, as
    close as PyTorch's; tests/test_model_precision.py).
    """
    freqs = jnp.asarray(timestep_frequencies(dim, max_period, freq_shift))  # (half,) float32 constants
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # (N, half): one float32 product, like the release
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# Longest stretch of a contraction that `chunked_dot_general` lets one float32 dot accumulate on CPU.
# XLA:CPU's YNNPACK dots (jaxlib >= 0.9's default) sum each output over the whole contraction in one float32
# accumulator, so the rounding error grows like sqrt(K): DiT's output lands 1.6-2.8x further from float64
# than the release's (MKL) float32 at small t. Slices of <= 128 products, added in float32, put it at
# 0.6-0.95x the release's (DiT-L/2, nine t; 256 gave up to 1.4x) for the same cost as 256.
DOT_CHUNK = 128


def chunked_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                        preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` for x (..., K) @ W (K, F) that, on CPU, sums dots over <= DOT_CHUNK-long slices of K.

    Used (as `nn.Dense(dot_general=...)`) for the conditioning path, whose dots have only N rows, and the final
    linear, whose dots have few columns, so the slicing costs nothing measurable; for the blocks' per-token
    dots only with `DiT(precise_cpu_dots=True)`
    (8-17% more time in the forward). Other platforms get the plain dot: their kernels accumulate
    differently, and their programs stay unchanged. Partial sums are float32 whatever the operand dtype.
    """
    (lhs_contract, rhs_contract), batch = dimension_numbers
    k = lhs.shape[-1]
    n_chunks = -(-k // DOT_CHUNK)
    plain = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                              preferred_element_type=preferred_element_type)
    if n_chunks == 1 or tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or batch != ((), ()):
        return plain(lhs, rhs)
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)

    def chunked(lhs, rhs):
        bounds = [i * k // n_chunks for i in range(n_chunks + 1)]
        parts = [jax.lax.dot_general(lhs[..., a:b], rhs[a:b], dimension_numbers, precision,
                                     preferred_element_type=jnp.float32) for a, b in zip(bounds, bounds[1:])]
        return sum(parts[1:], parts[0]).astype(out_dtype)  # (..., F)

    return jax.lax.platform_dependent(lhs, rhs, cpu=chunked, default=plain)


def token_dot_general(precise: bool):
    """The `dot_general` of a per-token nn.Dense: chunked on CPU when asked (None: flax's plain dot)."""
    return chunked_dot_general if precise else None


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x (N, T, D) float32, shift/scale (N, D) float32."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, always in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------
def _swap_last(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array):
    """-> (out (N, H, T, Dh), unnormalised probabilities e (N, H, T, S) float32, row sums l (N, H, T, 1),
    row maxima m (N, H, T, 1) float32)."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.matmul(q * scale, _swap_last(k), preferred_element_type=jnp.float32)  # (N, H, T, S)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    l = jnp.sum(e, axis=-1, keepdims=True)  # (N, H, T, 1)
    # Normalise after the value product: a (T, Dh) division instead of a (T, S) one (same maths; on CPU the
    # forward is ~2x faster than softmax-then-matmul, faster than PyTorch's SDPA on the same shapes).
    out = jnp.matmul(e.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return out.astype(v.dtype), e, l, m


@jax.custom_vjp
def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention on head-major (N, H, T, Dh) q/k/v -> (N, H, T, Dh); logits and softmax in float32.

    The same maths as `jax.nn.dot_product_attention`'s XLA path, written as plain batched matmuls over
    (N, H) (which XLA's CPU dot kernels run ~1.5x faster than the (N, T, H, Dh) einsums) with a hand-written
    backward pass: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(Dh), dK = dS^T Q / sqrt(Dh).
    Gradients equal autodiff of the plain softmax formula (tests/test_attention.py). The backward pass keeps
    the probabilities P (N, H, T, S); `recomputing_attention` keeps only their row statistics.
    """
    return _attention_forward(q, k, v)[0]


def _attention_fwd_rule(q, k, v):
    out, e, l, _ = _attention_forward(q, k, v)
    out = checkpoint_name(out, ATTN_OUT)  # named for the remat policies (dit_jax/nn/remat.py)
    return out, (q, k, v, out, checkpoint_name((e / l).astype(v.dtype), ATTN_PROBS))  # P (N, H, T, S)


def _attention_grads(q, k, v, g, p, delta, p_lowp):
    """dq, dk, dv (float32) of one group of heads from the probabilities p and delta = rowsum(dO * O)."""
    f32 = jnp.float32
    scale = q.shape[-1] ** -0.5
    dv = jnp.matmul(_swap_last(p_lowp), g.astype(p_lowp.dtype), preferred_element_type=f32)  # (N, H, S, Dh)
    dp = jnp.matmul(g, _swap_last(v), preferred_element_type=f32)  # (N, H, T, S)
    ds = (p.astype(f32) * (dp - delta) * scale).astype(q.dtype)  # gradient of the scaled logits
    dq = jnp.matmul(ds, k, preferred_element_type=f32)  # (N, H, T, Dh)
    dk = jnp.matmul(_swap_last(ds), q, preferred_element_type=f32)  # (N, H, S, Dh)
    return dq, dk, dv


def _attention_bwd_rule(res, g):
    q, k, v, out, p = res  # g: (N, H, T, Dh)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # (N, H, T, 1)
    dq, dk, dv = _attention_grads(q, k, v, g, p, delta, p)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


head_major_attention.defvjp(_attention_fwd_rule, _attention_bwd_rule)


# Largest (T, S) float32 logits, times heads, that one step of `recomputing_attention` materialises per
# example: 2^20 elements (4 MiB). 256 px (T = 256): all 16 heads at once; 512 px (T = 1024): one head a step.
ATTENTION_CHUNK_ELEMENTS = 2**20


def _heads_per_step(heads: int, t: int, s: int) -> int:
    n = max(1, min(heads, ATTENTION_CHUNK_ELEMENTS // (t * s)))
    while heads % n:
        n -= 1
    return n


def _over_head_groups(fn, heads_per_step: int, *arrays):
    """fn(*arrays) computed `heads_per_step` heads at a time (a `lax.map`); arrays are (N, H, ...)."""
    h = arrays[0].shape[1]
    if heads_per_step >= h:
        return fn(*arrays)
    groups = h // heads_per_step

    def split(a):  # (N, H, ...) -> (G, N, H/G, ...)
        return jnp.moveaxis(a.reshape(a.shape[0], groups, heads_per_step, *a.shape[2:]), 1, 0)

    def join(a):  # (G, N, H/G, ...) -> (N, H, ...)
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(a.shape[0], h, *a.shape[3:])

    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays))
    return jax.tree_util.tree_map(join, out)


def _forward_with_lse(q, k, v):
    """-> (out (N, H, T, Dh), log-sum-exp of the scaled logits (N, H, T, 1) float32), a group of heads a step."""
    def one(q, k, v):
        out, _, l, m = _attention_forward(q, k, v)
        return out, m + jnp.log(l)

    return _over_head_groups(one, _heads_per_step(q.shape[1], q.shape[2], k.shape[2]), q, k, v)


@jax.custom_vjp
def recomputing_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`head_major_attention` whose backward pass keeps only the output and the rows' log-sum-exp L and
    recomputes the probabilities P = exp(q k^T / sqrt(Dh) - L), as flash attention does: no (N, H, T, S)
    array outlives a block. Forward and backward run over groups of heads whose float32 (T, S) logits stay
    under ATTENTION_CHUNK_ELEMENTS per example, so the largest temporary is bounded at 512 px as well.
    The same outputs as head_major_attention; gradients equal to rounding (tests/test_attention.py).
    """
    return _forward_with_lse(q, k, v)[0]


def _recomputing_fwd_rule(q, k, v):
    out, lse = _forward_with_lse(q, k, v)
    out, lse = checkpoint_name(out, ATTN_OUT), checkpoint_name(lse, ATTN_LSE)
    return out, (q, k, v, out, lse)


def _recomputing_bwd_rule(res, g):
    q, k, v, out, lse = res  # g: (N, H, T, Dh)

    def one(q, k, v, g, out, lse):
        delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # (N, h, T, 1)
        scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        logits = jnp.matmul(q * scale, _swap_last(k), preferred_element_type=jnp.float32)  # as in the forward
        p = jnp.exp(logits - lse)  # (N, h, T, S) float32
        return _attention_grads(q, k, v, g, p, delta, p.astype(v.dtype))

    dq, dk, dv = _over_head_groups(one, _heads_per_step(q.shape[1], q.shape[2], k.shape[2]), q, k, v, g, out, lse)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


recomputing_attention.defvjp(_recomputing_fwd_rule, _recomputing_bwd_rule)
