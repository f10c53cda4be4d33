"""Remat policies of the DiT blocks: what the backward pass keeps from the forward, chosen by name.

Each block names the outputs of its matmuls with `jax.ad_checkpoint.checkpoint_name` (the names below);
a policy is the set of names whose values the backward pass keeps, everything else in the block (LayerNorm,
adaLN modulation, GELU, the softmax, casts) being recomputed from them and the block's float32 input. The
names follow MaxText's `remat_policy` in spirit:

    none                   no rematerialisation: autodiff keeps every value it needs (fastest, most memory)
    full                   keep only each block's input; the whole block is recomputed in the backward pass
    save_dots              keep every matmul output, in the compute dtype: the modulation, qkv, the attention
                           output (probabilities @ V), proj, fc1 and fc2
    save_dots_except_fc1   save_dots without fc1 (4D wide): fc1 is recomputed (MaxText's save_dot_except_mlpwi)
    save_qkv_proj          keep the modulation, qkv and proj; attention and the MLP are recomputed

Bytes kept per token and block with bfloat16 compute (D = hidden size, carry = the float32 block input):
save_dots 20 D + carry 4 D, save_dots_except_fc1 12 D + 4 D, save_qkv_proj 8 D + 4 D, full 4 D; none keeps
about 100 D plus the attention probabilities. docs/performance.md has the measured table and the default
per platform (`default_policy`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  (re-exported for the model's tags)

# The tags of a block's values (dit_jax/model.py, dit_jax/nn/model_ops.py).
ADALN = "adaln"  # (N, 6D) float32: the six modulation vectors
QKV = "qkv"  # (N, T, 3D) compute dtype
ATTN_OUT = "attn_out"  # (N, H, T, Dh) compute dtype: softmax(q k^T) v, before proj
ATTN_PROBS = "attn_probs"  # (N, H, T, T) compute dtype: kept by "none" only
ATTN_LSE = "attn_lse"  # (N, H, T, 1) float32: the softmax rows' log-sum-exp, from which the others recompute P
PROJ = "proj"  # (N, T, D) compute dtype
FC1 = "fc1"  # (N, T, 4D) compute dtype, before GELU
FC2 = "fc2"  # (N, T, D) compute dtype

_SAVE = {
    "save_dots": (ADALN, QKV, ATTN_OUT, ATTN_LSE, PROJ, FC1, FC2),
    "save_dots_except_fc1": (ADALN, QKV, ATTN_OUT, ATTN_LSE, PROJ, FC2),
    "save_qkv_proj": (ADALN, QKV, PROJ),
}
POLICIES = ("none", "full") + tuple(_SAVE)

# The default by platform of the devices that run the step (docs/performance.md, "Activation memory and
# remat policies"): on CPU nothing is recomputed, as memory is rarely short there and recomputation costs
# time. On TPU save_qkv_proj: DiT-XL/2 (--compile-only, v5p, data parallel) keeps 0.21 GiB per image per chip
# at 256 px with it against 0.37 with save_dots (libtpu holds the kept values twice), so only it meets issue 21's
# 0.25 GiB, for ~23% more FLOPs per step. On GPU save_dots (~1% more FLOPs): the values it keeps count
# 0.19 GiB per image at 256 px (dit_jax/analysis/block_memory.py); not yet measured on a GPU.
DEFAULT_POLICY = {"cpu": "none", "tpu": "save_qkv_proj"}
ACCELERATOR_DEFAULT = "save_dots"


def default_policy(platform: str) -> str:
    """The remat policy a run gets when config.model.remat_policy is unset, for devices of `platform`."""
    return DEFAULT_POLICY.get(platform, ACCELERATOR_DEFAULT)


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; choose one of {list(POLICIES)}")
    return name


def resolve(remat_policy: Optional[str], remat: bool = False) -> str:
    """The policy of `DiT(remat=..., remat_policy=...)`: the older boolean `remat=True` means "full"."""
    name = check_policy(remat_policy or "none")
    if remat:
        if name not in ("none", "full"):
            raise ValueError(f"remat=True (the older name of remat_policy='full') conflicts with "
                             f"remat_policy={name!r}; set only remat_policy")
        return "full"
    return name


def checkpoint_block(fn: Callable, policy: str, prevent_cse: bool = True) -> Callable:
    """`fn` (one block) wrapped by `jax.checkpoint` with the named policy ("none": `fn` itself).

    prevent_cse=False inside `lax.scan` (the loop already keeps XLA from merging the recomputation back
    into the forward pass, and the barrier would cost time)."""
    check_policy(policy)
    if policy == "none":
        return fn
    if policy == "full":
        saveable = jax.checkpoint_policies.nothing_saveable
    else:
        saveable = jax.checkpoint_policies.save_only_these_names(*_SAVE[policy])
    return jax.checkpoint(fn, policy=saveable, prevent_cse=prevent_cse)


def recomputed_block_macs(policy: str, tokens: int, hidden: int, mlp_hidden: int) -> int:
    """Multiply-adds of one block's forward that the backward pass runs again under `policy`, per example
    (for the FLOPs that a step executes; MFU does not count them). The selective policies recompute the
    attention logits q k^T (flash-style: only the output and its row statistics are kept); save_dots_except_fc1
    fc1 too; save_qkv_proj the whole attention (q k^T and P V) and both MLP matmuls."""
    t, d, m = tokens, hidden, mlp_hidden
    logits = t * t * d
    return {"none": 0, "full": d * 6 * d + t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m,
            "save_dots": logits, "save_dots_except_fc1": logits + t * d * m,
            "save_qkv_proj": 2 * logits + 2 * t * d * m}[check_policy(policy)]

