"""The DiT parameter layout: the blocks' parameters stacked along a leading depth axis, and the older layout.

Since issue 21 a DiT keeps its L blocks' parameters in one subtree `blocks` whose arrays carry a leading
axis of length L (`blocks/attn/qkv/kernel` is (L, D, 3D)), as MaxText's `scan_layers` and `nn.scan` do: the
`lax.scan` over the blocks slices them in place, so no step copies the parameters (or their gradients).
Models converted and checkpoints written before that keep one subtree per block, `blocks_0` ...
`blocks_{L-1}` (the release's `blocks.i.*` names); `stack_blocks` turns that layout into this one and
`unstack_blocks` back (the converter maps `blocks.i.*` keys through it).

The functions work on any pytree holding parameter trees (the train state: params, EMA and Adam's moments):
every dict with a `blocks` (or `blocks_0`) key is a parameter tree and is converted, everything else is kept.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import numpy as np

STACKED = "blocks"  # the stacked subtree; its arrays are (depth, ...)
PER_BLOCK = re.compile(r"blocks_(\d+)")  # the older layout's subtrees, one per block


def is_per_block(tree: Any) -> bool:
    """True when `tree` (params, a train state, or orbax's metadata of one) holds the older `blocks_i` layout."""
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(PER_BLOCK.fullmatch(str(getattr(k, "key", ""))) for k in path):
            return True
    return False


def _map_param_trees(tree: Any, fn: Callable[[dict], dict], key: Callable[[str], bool]) -> Any:
    """`fn` applied to every dict of `tree` that has a key for which `key` holds; other nodes unchanged."""
    def is_param_tree(x):
        return isinstance(x, dict) and any(isinstance(k, str) and key(k) for k in x)

    return jax.tree_util.tree_map(lambda x: fn(x) if is_param_tree(x) else x, tree, is_leaf=is_param_tree)


def _stack_one(params: dict, stack: Callable) -> dict:
    blocks = sorted(((int(m.group(1)), k) for k in params if (m := PER_BLOCK.fullmatch(k))))
    if [i for i, _ in blocks] != list(range(len(blocks))):
        raise ValueError(f"per-block parameters {[k for _, k in blocks]} are not blocks_0 ... blocks_{len(blocks) - 1}")
    if STACKED in params:
        raise ValueError(f"parameters hold both '{STACKED}' and {blocks[0][1]!r}: mixed layouts")
    per_block = [params[k] for _, k in blocks]
    first = jax.tree_util.tree_structure(per_block[0])
    for (_, k), p in zip(blocks, per_block):
        if jax.tree_util.tree_structure(p) != first:
            raise ValueError(f"{k} has other parameters than {blocks[0][1]}: {jax.tree_util.tree_structure(p)}")
    out = {k: v for k, v in params.items() if not PER_BLOCK.fullmatch(k)}
    out[STACKED] = jax.tree_util.tree_map(lambda *xs: stack(xs), *per_block)
    return out


def _unstack_one(params: dict, take: Callable) -> dict:
    stacked = params[STACKED]
    depth = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(stacked)}
    if len(depth) != 1:
        raise ValueError(f"'{STACKED}' arrays have different leading (depth) sizes {sorted(depth)}")
    out = {k: v for k, v in params.items() if k != STACKED}
    for i in range(depth.pop()):
        out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: take(x, i), stacked)
    return out


def _np_stack(xs):
    return np.stack([np.asarray(x) for x in xs])


def stack_blocks(tree: Any, stack: Callable = _np_stack) -> Any:
    """Older layout -> stacked: every `{"blocks_0": p0, ..., "blocks_{L-1}": pL}` becomes `{"blocks": p}` with
    p's arrays (L, ...). Trees already stacked pass unchanged. `stack` joins a tuple of arrays (default:
    NumPy; pass `jnp.stack` inside jit, or `jax.ShapeDtypeStruct` builders for abstract trees)."""
    return _map_param_trees(tree, lambda p: _stack_one(p, stack), lambda k: bool(PER_BLOCK.fullmatch(k)))


def unstack_blocks(tree: Any, take: Callable = lambda x, i: x[i]) -> Any:
    """Stacked -> older layout: `{"blocks": p}` becomes `blocks_0` ... `blocks_{L-1}` with p's slices."""
    return _map_param_trees(tree, lambda p: _unstack_one(p, take), lambda k: k == STACKED)
