"""mesh_plan's activation count (dit_jax/analysis/block_memory.py): JAX's saved residuals of one block, by policy,
against the widths written out by hand, and the estimate's platform rule."""
import jax.numpy as jnp
import pytest

from dit_jax import mesh_plan
from dit_jax.analysis import block_memory
from dit_jax.model import DiT

T, D, H = 64, 96, 4  # tokens, width, heads


@pytest.mark.parametrize("policy,per_token,lse", [
    ("full", 4, False),  # the float32 block input
    ("save_dots", 4 + 2 * (3 + 1 + 1 + 4 + 1), True),  # + qkv, attention out, proj, fc1, fc2 in bfloat16
    ("save_dots_except_fc1", 4 + 2 * (3 + 1 + 1 + 1), True),
    ("save_qkv_proj", 4 + 2 * (3 + 1), False),
])
def test_kept_bytes_per_example_by_policy(policy, per_token, lse):
    per_example, fixed = block_memory.kept_bytes(T, D, H, 4.0, "bfloat16", policy)
    modulation = 0 if policy == "full" else 6 * D * 4  # float32 (N, 6D)
    assert per_example == T * D * per_token + (T * H * 4 if lse else 0) + modulation
    assert fixed == 0  # nothing but the batch's values


def test_none_keeps_the_probabilities_and_the_bfloat16_weights():
    per_example, fixed = block_memory.kept_bytes(T, D, H, 4.0, "bfloat16", "none")
    assert per_example > H * T * T * 2 + T * D * 4 * 10  # probabilities + at least save_dots' values
    weights = D * 6 * D + D * 3 * D + D * D + 2 * D * 4 * D  # the block's kernels, kept in bfloat16
    assert weights * 2 <= fixed <= (weights + 16 * D) * 2


def test_activations_grow_with_depth_and_tpu_data_parallel_keeps_a_second_copy():
    m = DiT(input_size=16, patch_size=2, hidden_size=D, num_heads=H, depth=4, dtype=jnp.bfloat16,
            remat_policy="save_dots")
    every = block_memory.model_kept_bytes(m, "none")[0]
    kept = block_memory.model_kept_bytes(m, "save_dots")[0]
    assert mesh_plan.activation_bytes_per_example(m, False, "gpu") == 4 * kept + every
    assert mesh_plan.activation_bytes_per_example(m, True, "gpu") == 4 * kept + every  # no libtpu copy
    assert mesh_plan.activation_bytes_per_example(m, True, "tpu") == 8 * kept + every
    assert mesh_plan.activation_bytes_per_example(m.clone(remat_policy="none"), True, "tpu") == 4 * every
