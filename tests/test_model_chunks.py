"""Sampling-time batch chunking (dit_jax.diffusion.apply_in_chunks / dit_model_fn batch_chunk): same outputs.

Each case is one jitted program holding the chunked forwards and the one-call reference side by side (one
compile per case; op-by-op eager applies of the model cost several times that on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.guidance import CPU_BATCH_CHUNK, apply_in_chunks, dit_model_fn, resolve_batch_chunk
from dit_jax.model import DiT, init_params
from conftest import rel_err


@pytest.fixture(scope="module")
def tiny():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    params = jax.device_get(jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0)))
    r = np.random.default_rng(1)  # NumPy noise on every leaf (no zero adaLN): no per-shape eager compiles
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * r.standard_normal(p.shape).astype(np.float32), params)
    return model, params


def _inputs(n):
    x = jax.random.normal(jax.random.PRNGKey(2), (n, 8, 8, 4))  # (N, H, W, C)
    t = jnp.arange(n) * 97 % 1000
    y = jnp.arange(n) % 5
    return x, t, y


@pytest.mark.parametrize("n,chunk", [(6, 2), (7, 3), (5, 8), (4, None)])
def test_apply_in_chunks_equals_one_call(tiny, n, chunk):
    model, params = tiny
    x, t, y = _inputs(n)

    def chunked_and_whole(p, x, t, y):
        fn = lambda x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
        return apply_in_chunks(fn, chunk, x, t, y), fn(x, t, y)

    got, whole = jax.jit(chunked_and_whole)(params, x, t, y)
    assert got.shape == (n, 8, 8, 8)
    assert rel_err(got, whole) < 1e-6


CHUNKS = (0, 2, 3, "auto")


@pytest.mark.parametrize("cfg_scale,guidance_channels", [(1.0, 3), (4.0, 3), (4.0, None)])
def test_chunked_model_fn_equals_forward_with_cfg(tiny, cfg_scale, guidance_channels):
    model, params = tiny
    x, t, y = _inputs(5)

    def want_and_chunked(p, x, t):
        if cfg_scale > 1:
            null = jnp.full_like(y, model.num_classes)
            want = model.apply({"params": p}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                               jnp.concatenate([y, null]), cfg_scale, guidance_channels,
                               method=DiT.forward_with_cfg)[:5]
        else:
            want = model.apply({"params": p}, x, t, y)
        return want, [dit_model_fn(model, p, y, cfg_scale, guidance_channels, batch_chunk=c)(x, t) for c in CHUNKS]

    want, got = jax.jit(want_and_chunked)(params, x, t)
    for chunk, out in zip(CHUNKS, got):
        # float32 rounding only: a dot's summation blocks depend on how many rows it gets (measured 1.04e-6)
        assert rel_err(out, want) < 2e-6, chunk


def test_resolve_batch_chunk():
    assert resolve_batch_chunk("auto") == (CPU_BATCH_CHUNK if jax.default_backend() == "cpu" else None)
    assert resolve_batch_chunk(0) is None and resolve_batch_chunk(None) is None
    assert resolve_batch_chunk(4) == 4
    with pytest.raises(ValueError, match="batch_chunk must be >= 0"):
        resolve_batch_chunk(-1)
