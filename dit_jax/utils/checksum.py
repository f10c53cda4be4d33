"""Fingerprints of arrays: a 32-bit checksum that any single flipped bit changes, equal for NumPy and JAX.

fingerprint(x) = sum_i bits(x_i) * (2i + 1) mod 2^32 over the flattened array, bits being the raw 32-bit
words of the elements (16- and 8-bit elements are widened, 64-bit ones split in two words). A flip of bit k
of one word changes the sum by 2^k * (2i + 1), never 0 mod 2^32 because 2i + 1 is odd. The sum is exact
integer arithmetic, so it does not depend on how an array is sharded or in which order shards are added:
a checkpoint written on one mesh checks out on another.

Sharded arrays are summed where they live, never gathered: every device adds up the weighted words of its
own shard, the global flat index i of each element coming from the shard's offset in the array (its block
position along each sharded mesh axis) plus an iota. Copies of a shard that the mesh replicates count
once (only the copy at index 0 of the unused mesh axes adds its sum). The per-device partial sums (one
uint32 per array) are added up on the host, and across processes through an all-gather of those scalars
(`Partials`, which dit_jax.checkpoint uses to combine them with its verdict).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_MOD = 1 << 32


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
    """The checksum of one whole array (a uint32 scalar of the same framework)."""
    xp = jnp if isinstance(x, jax.Array) else np  # tracers are jax.Arrays too
    if xp is np and np.asarray(x).dtype == np.bool_:
        x = np.asarray(x).astype(np.uint8)
    w = _words(xp.asarray(x), xp)
    odd = xp.arange(w.shape[0], dtype=xp.uint32) * xp.uint32(2) + xp.uint32(1)
    return xp.sum(w * odd, dtype=xp.uint32)


@jax.jit
def _device_fingerprints(tree):
    return jax.tree_util.tree_map(fingerprint, tree)


# ----------------------------------------------------------------------------------------------------
# One shard at a time
# ----------------------------------------------------------------------------------------------------
def _block_words(x):
    """(*shape) -> (*shape, k) uint32: the k raw 32-bit words of each element (k = 2 for 64-bit types)."""
    size = x.dtype.itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)[..., None]
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2), low word first like NumPy's view
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)[..., None]
    small = jnp.uint16 if size == 2 else jnp.uint8
    return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)[..., None]


def block_sum(block, offsets: Sequence[Any], global_shape: Tuple[int, ...]):
    """The part of fingerprint(array) contributed by `block`, the sub-array of `array` (of `global_shape`)
    that starts at `offsets` (one uint32 per dimension): sum of its words times (2i + 1), i being each
    word's index in the flattened whole array. Summing the blocks of a partition gives fingerprint(array)."""
    w = _block_words(block)  # (*local, k)
    k = w.shape[-1]
    strides = [int(np.prod(global_shape[d + 1:], dtype=object)) % _MOD for d in range(len(global_shape))]
    elem = jnp.zeros(block.shape, jnp.uint32)  # global flat element index, mod 2^32 like the weights
    for d in range(block.ndim):
        pos = jax.lax.broadcasted_iota(jnp.uint32, block.shape, d) + jnp.asarray(offsets[d], jnp.uint32)
        elem = elem + pos * jnp.uint32(strides[d])
    word = elem[..., None] * jnp.uint32(k) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, block.ndim)
    return jnp.sum(w * (word * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _spec_axes(spec: P, ndim: int) -> List[Tuple[str, ...]]:
    """The mesh axes each dimension is split over (major first), () where it is not split."""
    out = []
    for d in range(ndim):
        entry = spec[d] if d < len(spec) else None
        out.append(() if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry)))
    return out


@functools.lru_cache(maxsize=64)
def _partials_program(mesh: Mesh, specs: Tuple[P, ...], shapes: Tuple[Tuple[int, ...], ...]):
    """jit(shard_map): each device -> (1, n) uint32, its share of the n arrays' fingerprints."""
    names = tuple(mesh.axis_names)

    def per_device(*blocks):
        sums = []
        for block, spec, shape in zip(blocks, specs, shapes):
            axes = _spec_axes(spec, len(shape))
            offsets = []
            for d, split in enumerate(axes):
                index = jnp.uint32(0)
                for a in split:  # the block's position along this dimension, major axis first
                    index = index * jnp.uint32(mesh.shape[a]) + jax.lax.axis_index(a).astype(jnp.uint32)
                offsets.append(index * jnp.uint32(block.shape[d]))
            used = {a for split in axes for a in split}
            first_copy = jnp.bool_(True)
            for a in names:
                if a not in used:  # the block is replicated along a: only copy 0 counts
                    first_copy = first_copy & (jax.lax.axis_index(a) == 0)
            sums.append(jnp.where(first_copy, block_sum(block, offsets, shape), jnp.uint32(0)))
        return jnp.stack(sums)[None] if sums else jnp.zeros((1, 0), jnp.uint32)

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(names, None),
                                 check_vma=False))


def _is_sharded(v) -> bool:
    return isinstance(v, jax.Array) and isinstance(v.sharding, NamedSharding) and len(v.sharding.device_set) > 1


def _groups(leaves: Dict[str, Any]) -> Dict[Mesh, List[str]]:
    out: Dict[Mesh, List[str]] = {}
    for k, v in leaves.items():
        out.setdefault(v.sharding.mesh, []).append(k)
    return out


def partials_hlo(tree) -> List[str]:
    """The compiled HLO text of the per-shard programs `local_partials` runs on `tree` (one per mesh)."""
    leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_sharded(v)}
    out = []
    for mesh, keys in _groups(leaves).items():
        arrays = [leaves[k] for k in keys]
        fn = _partials_program(mesh, tuple(a.sharding.spec for a in arrays), tuple(a.shape for a in arrays))
        out.append(fn.lower(*arrays).compile().as_text())
    return out


# ----------------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Partials:
    """This process's view of a tree's checksums: `values[j]` is the checksum of `keys[j]`, or, where
    `shared[j]` (an array spread over several processes), this process's share of it."""

    keys: List[str]
    values: np.ndarray  # (n,) uint32
    shared: np.ndarray  # (n,) bool

    @property
    def needs_gather(self) -> bool:
        """Whether the processes must add up their shares (the same answer on every process)."""
        return bool(self.shared.any()) and jax.process_count() > 1

    def total(self, gathered: Optional[np.ndarray] = None) -> Dict[str, int]:
        """{key: checksum}; `gathered`: (processes, n) every process's `values` when `needs_gather`."""
        if self.needs_gather:
            if gathered is None:
                raise ValueError("the checksums of arrays spread over processes need every process's share")
            summed = np.asarray(gathered, np.uint64).sum(axis=0) % _MOD
            values = np.where(self.shared, summed, self.values.astype(np.uint64))
        else:
            values = self.values
        return {k: int(v) for k, v in zip(self.keys, values)}


def local_partials(tree) -> Partials:
    """Each array's checksum, or this process's share of it, computed without moving any array: sharded
    arrays shard by shard on their devices (one program per mesh), other JAX arrays on their device,
    NumPy arrays here. Needs no other process (nothing collective happens here)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    by_key = dict(zip(keys, (v for _, v in leaves)))
    sharded = {k: v for k, v in by_key.items() if _is_sharded(v)}
    single = {k: v for k, v in by_key.items() if isinstance(v, jax.Array) and k not in sharded}
    values: Dict[str, int] = {}
    pending = []
    for mesh, ks in _groups(sharded).items():
        arrays = [sharded[k] for k in ks]
        fn = _partials_program(mesh, tuple(a.sharding.spec for a in arrays), tuple(a.shape for a in arrays))
        pending.append((ks, fn(*arrays)))  # (devices, n), dispatched before anything is read back
    singles = _device_fingerprints(single) if single else {}
    for ks, out in pending:
        mine = sum(np.asarray(s.data, np.uint64).reshape(-1, len(ks)).sum(axis=0) for s in out.addressable_shards)
        values.update({k: int(v) % _MOD for k, v in zip(ks, np.atleast_1d(mine))})
    values.update({k: int(v) for k, v in jax.device_get(singles).items()})
    for k, v in by_key.items():
        if k not in values:
            values[k] = int(fingerprint(np.asarray(v)))
    shared = np.array([k in sharded and not sharded[k].is_fully_addressable for k in keys], bool)
    return Partials(keys, np.array([values[k] for k in keys], np.uint32), shared)


def gather(values: np.ndarray) -> np.ndarray:
    """(n,) per process -> (processes, n): every process's vector (a collective: every process calls it)."""
    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def tree_fingerprints(tree) -> Dict[str, int]:
    """{key path: checksum} of every array of a tree. With arrays spread over several processes every
    process must call it (their shares are combined through an all-gather of one scalar per array)."""
    p = local_partials(tree)
    return p.total(gather(p.values) if p.needs_gather else None)


def mismatches(expected: Dict[str, int], got: Dict[str, int]) -> list:
    """Key paths whose checksum differs (or that are missing on either side), sorted."""
    return sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
