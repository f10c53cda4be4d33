"""Model functions for the samplers: a DiT with fixed labels as `model_fn(x, t)`, classifier-free guidance,
and batch chunking.

    model_fn = dit_model_fn(model, params, labels, cfg_scale=4.0)          # guided, the release's 3 channels
    x0 = create_diffusion("ddim50").ddim_sample_loop(model_fn, shape, noise=x_T)

This is the glue between dit_jax.model and dit_jax.diffusion, which know nothing of each other.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dit_jax.diffusion import ModelFn
from dit_jax.model import DiT, apply_guidance

# Examples per DiT call when sampling on a CPU: activations of 8 latents at 256 px stay in cache, so two
# calls of 8 beat one of 16 by ~11% (DiT-S/2, docs/performance.md). Accelerators take the whole batch.
CPU_BATCH_CHUNK = 8


def resolve_batch_chunk(batch_chunk: Any = "auto") -> Optional[int]:
    """"auto" -> CPU_BATCH_CHUNK on a CPU backend, else None; 0/None -> None (no chunking); n -> n."""
    if batch_chunk == "auto":
        return CPU_BATCH_CHUNK if jax.default_backend() == "cpu" else None
    if batch_chunk is None or int(batch_chunk) == 0:
        return None
    if int(batch_chunk) < 0:
        raise ValueError(f"batch_chunk must be >= 0 (0: no chunking), got {batch_chunk}")
    return int(batch_chunk)


def apply_in_chunks(fn: Callable[..., jax.Array], chunk: Optional[int], *args: jax.Array) -> jax.Array:
    """fn(*args) evaluated `chunk` examples at a time along the leading axis (a `lax.map`, one compiled body).

    Equal to fn(*args) when fn treats examples independently, as the DiT forward does (no batch statistics).
    """
    n = args[0].shape[0]
    if chunk is None or n <= chunk:
        return fn(*args)
    m = n - n % chunk

    def split(a):  # (m, ...) -> (m / chunk, chunk, ...)
        return a[:m].reshape(m // chunk, chunk, *a.shape[1:])

    out = jax.lax.map(lambda a: fn(*a), tuple(split(a) for a in args))
    out = out.reshape(m, *out.shape[2:])
    if m < n:
        out = jnp.concatenate([out, fn(*(a[m:] for a in args))], axis=0)
    return out


def dit_model_fn(model: DiT, params: Any, labels: jax.Array, cfg_scale: float = 1.0,
                 guidance_channels: Optional[int] = 3, batch_chunk: Any = "auto") -> ModelFn:
    """model_fn(x, t) for a flax DiT with fixed class labels (N,); guided when cfg_scale > 1.

    With guidance the function doubles the batch internally (labels, then the null class
    `model.num_classes`), runs the DiT on it and guides like `DiT.forward_with_cfg`, returning the guided
    first half, so the sampling loop itself only carries N examples. Use it inside jit with `params` as a
    traced argument. batch_chunk: examples per DiT call ("auto": `CPU_BATCH_CHUNK` on CPU, whole batch on
    accelerators; 0/None: whole batch), see `apply_in_chunks`.
    """
    variables = {"params": params}
    chunk = resolve_batch_chunk(batch_chunk)
    # The blocks run as the model says (by default one lax.scan over the stacked parameters): for a forward
    # alone the scan and a Python loop over the blocks take the same time on CPU (DiT-S/2, docs/performance.md),
    # and the scan compiles one block instead of depth of them.

    def dit(x, t, y):
        return model.apply(variables, x, t, y, train=False)

    if cfg_scale <= 1.0:
        return lambda x, t: apply_in_chunks(dit, chunk, x, t, labels)
    if not getattr(model, "class_dropout_prob", 0.0) > 0:
        raise ValueError("classifier-free guidance needs a DiT trained with class dropout (a null-class row in "
                         "y_embedder); this model has class_dropout_prob=0, use cfg_scale=1")
    null = jnp.full_like(labels, model.num_classes)
    guided_channels = model.in_channels if guidance_channels is None else guidance_channels

    def guided(x, t):
        n = x.shape[0]
        out = apply_in_chunks(dit, chunk, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                              jnp.concatenate([labels, null]))  # (2N, H, W, C_out), conditional half first
        return apply_guidance(out, cfg_scale, guided_channels)[:n]

    return guided
