"""One small DiT's training loss, output and parameter gradients per (remat policy, scan_blocks), each compiled
once per test process: tests/test_model_scan.py (the scanned blocks against the unrolled ones) and
tests/test_remat_policies.py (every policy against "none") compare the same programs, so a process that runs
both compiles each of them once (and one that runs only one of them finds the other's programs in the
session's XLA cache when they ran first).

Both modules compare these programs only with each other, never with a reference computed another way, so
they are compiled like tests/conftest.py's FAST_COMPILE_MODULES (jax_disable_most_optimizations, XLA's
backend optimisation level 0): half the compile time (measured 3.4-4.7 s -> 1.7-2.7 s each on 2 cores).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.model import DiT, abstract_params

KW = dict(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)


@functools.lru_cache(maxsize=None)
def params() -> dict:
    """N(0, 0.05) NumPy draws on the init's shapes (no init program to compile): no layer is zero, whereas the
    release init zeroes adaLN and the output layer, which would hide most of the blocks. The stacked layout
    is the same with and without scan_blocks (tests/test_model_scan.py)."""
    r = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda s: (0.05 * r.standard_normal(s.shape)).astype(np.float32),
                                  abstract_params(DiT(**KW)))


def inputs():
    """x (2, 8, 8, 4), t, and labels with the null class (10) among them."""
    rs = np.random.default_rng(0)
    return rs.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([5, 800]), np.array([1, 10])


@functools.lru_cache(maxsize=None)
def loss_out_grads(policy: str, scan_blocks: bool):
    """(loss, output (N, H, W, 2C), gradients of the loss) for loss = mean(output^2) in training mode (label
    dropout drawn from a fixed key), one jitted program per (policy, scan_blocks)."""
    model = DiT(**KW, scan_blocks=scan_blocks, remat_policy=policy)
    x, t, y = inputs()

    def loss(p):
        out = model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(jnp.square(out)), out

    before = jax.config.read("jax_disable_most_optimizations")  # True in a FAST_COMPILE_MODULES module
    jax.config.update("jax_disable_most_optimizations", True)  # read when this program is compiled, below
    try:
        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params())
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    return value, out, grads
