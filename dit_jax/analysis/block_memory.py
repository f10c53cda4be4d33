"""Bytes one DiT block keeps for its backward pass under a remat policy, read off JAX's own list of the
residuals it saves (`saved_residuals`, the list behind `jax.ad_checkpoint.print_saved_residuals`).

The count is of the traced program, before any compiler, so it is the same on TPU, GPU and CPU: mesh_plan's
estimate takes it instead of constants fitted to one platform's compiled programs. Abstract shapes only
(nothing is computed), so DiT-XL/2 at 512 px costs a trace of one block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.model import DiT, block_step

try:  # private home of the public print_saved_residuals' list; absent: the caller falls back to its table
    from jax._src.ad_checkpoint import saved_residuals
except ImportError:  # pragma: no cover
    saved_residuals = None


@functools.lru_cache(maxsize=64)
def kept_bytes(tokens: int, hidden: int, heads: int, mlp_ratio: float, dtype: str, policy: str) -> tuple:
    """(per example, per block call) bytes the backward pass keeps of one block: the float32 input and the
    values the policy saves, which grow with the batch, and what does not (under "none" the compute-dtype
    copies of the block's weights). Not counted: the parameters themselves (read in place from the stacked
    ones) and the conditioning (shared by all blocks). Traced at batches 1 and 2; the difference is one
    example. The head-major matmul attention is traced ("none" keeps its (H, T, T) probabilities)."""
    block = DiT(hidden_size=hidden, num_heads=heads, mlp_ratio=mlp_ratio, dtype=jnp.dtype(dtype),
                remat_policy=policy, attention_impl="matmul").block()

    def kept(n):
        h = jax.ShapeDtypeStruct((n, tokens, hidden), jnp.float32)  # (N, T, D)
        c = jax.ShapeDtypeStruct((n, hidden), jnp.float32)  # (N, D)
        params = jax.eval_shape(lambda h, c: block.init(jax.random.PRNGKey(0), h, c)["params"], h, c)

        def run(h, params, c):
            return block_step(block, c, policy, prevent_cse=False)(h, params)[0]

        total = 0
        for aval, what in saved_residuals(run, h, params, c):
            if what.startswith(("from the argument params", "from the argument c", "from a constant")):
                continue
            total += int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
        return total

    one, two = kept(1), kept(2)
    return two - one, 2 * one - two


def model_kept_bytes(model, policy: str) -> tuple:
    """`kept_bytes` (per example, fixed) of one block of a DiT module under `policy`."""
    t = (model.input_size // model.patch_size) ** 2
    return kept_bytes(t, model.hidden_size, model.num_heads, float(model.mlp_ratio),
                                  jnp.dtype(model.dtype).name, policy)
