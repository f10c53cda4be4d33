"""Fingerprints of arrays: a 32-bit checksum that any single flipped bit changes, equal for NumPy and JAX.

fingerprint(x) = sum_i bits(x_i) * (2i + 1) mod 2^32 over the flattened array, bits being the raw 32-bit
words of the elements (16- and 8-bit elements are widened, 64-bit ones split in two words). A flip of bit k
of one word changes the sum by 2^k * (2i + 1), never 0 mod 2^32 because 2i + 1 is odd. The sum is exact
integer arithmetic, so it does not depend on how an array is sharded or in which order shards are added:
a checkpoint written on one mesh checks out on another.
"""
from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np


def _words(x, xp):
    """The raw bits of x as uint32 words (flattened)."""
    x = xp.ravel(x)
    size = x.dtype.itemsize
    if xp is np:
        x = np.ascontiguousarray(x)
        if size == 4:
            return x.view(np.uint32)
        if size == 8:
            return x.view(np.uint32)
        if size == 2:
            return x.view(np.uint16).astype(np.uint32)
        return x.view(np.uint8).astype(np.uint32)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)


def fingerprint(x) -> Any:
    """The checksum of one array (a uint32 scalar of the same framework)."""
    xp = jnp if isinstance(x, jax.Array) else np  # tracers are jax.Arrays too
    if xp is np and np.asarray(x).dtype == np.bool_:
        x = np.asarray(x).astype(np.uint8)
    w = _words(xp.asarray(x), xp)
    odd = xp.arange(w.shape[0], dtype=xp.uint32) * xp.uint32(2) + xp.uint32(1)
    return xp.sum(w * odd, dtype=xp.uint32)


@jax.jit
def _device_fingerprints(tree):
    return jax.tree_util.tree_map(fingerprint, tree)


def tree_fingerprints(tree) -> Dict[str, int]:
    """{key path: checksum} of every array of a tree (JAX arrays are summed on their devices)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    on_device = {jax.tree_util.keystr(p): v for p, v in leaves if isinstance(v, jax.Array)}
    sums = jax.device_get(_device_fingerprints(on_device)) if on_device else {}
    out = {}
    for p, v in leaves:
        k = jax.tree_util.keystr(p)
        out[k] = int(sums[k]) if k in sums else int(fingerprint(np.asarray(v)))
    return out


def mismatches(expected: Dict[str, int], got: Dict[str, int]) -> list:
    """Key paths whose checksum differs (or that are missing on either side), sorted."""
    return sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
