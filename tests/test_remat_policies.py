"""Remat policies (dit_jax/nn/remat.py): what each keeps per block, that none changes the maths, the config.

The bytes a policy keeps are read off JAX's own list of the residuals of one block (the scan body the DiT
runs, `dit_jax.model.block_step`), so a change that makes the backward pass keep more (a value that loses
its name, a float32 copy) fails here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # the list behind jax.ad_checkpoint.print_saved_residuals

from conftest import rel_err, tiny_config
from small_dit_gradients import loss_out_grads
from dit_jax.training import build
from dit_jax.nn import remat
from dit_jax.model import DiT, block_step
from dit_jax.utils.errors import ConfigError

N, T, D, H = 2, 16, 64, 4  # examples, tokens, width, heads of the block under test
SELECTIVE = [p for p in remat.POLICIES if p not in ("none", "full")]


def kept_bytes(policy, dtype=jnp.bfloat16):
    """{description: bytes} of what the backward pass of one block keeps: its input h and every value it
    computes, but neither its parameters (slices of the stacked parameters, read in place) nor the
    conditioning c (the same for every block)."""
    block = DiT(hidden_size=D, num_heads=H, dtype=dtype, remat_policy=policy).block()  # as the DiT runs it
    h, c = np.ones((N, T, D), np.float32), jnp.ones((N, D), jnp.float32)
    # saved_residuals only traces: zeros in the init's shapes (NumPy, so no init program runs)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                    jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), h, c)["params"]))
    step = block_step(block, c, policy, prevent_cse=False)
    out = {}
    for aval, what in saved_residuals(lambda h, params: step(h, params)[0], h, params):
        if what.startswith("from the argument params") or what.startswith("from a constant") or not aval.shape:
            continue
        out[what] = out.get(what, 0) + int(np.prod(aval.shape)) * aval.dtype.itemsize
    return out


# Per token: bytes of the values kept, in units of D (bfloat16 compute, float32 block input), and whether
# the attention rows' float32 log-sum-exp (4 H bytes per token) is kept; per example: the float32 modulation
# (N, 6D), which does not grow with the tokens.
PER_TOKEN_D = {"full": 4, "save_dots": 4 + 2 * (3 + 1 + 1 + 4 + 1), "save_dots_except_fc1": 4 + 2 * (3 + 1 + 1 + 1),
               "save_qkv_proj": 4 + 2 * (3 + 1)}
KEEPS_LSE = {"save_dots", "save_dots_except_fc1"}


@pytest.mark.parametrize("policy", list(PER_TOKEN_D))
def test_bytes_kept_per_token_and_block(policy):
    kept = kept_bytes(policy)
    per_example = 0 if policy == "full" else 6 * D * 4
    total = sum(kept.values())
    print(f"\n{policy}: {total / (N * T * D):.2f} bytes per token and channel; " + ", ".join(
        f"{w.split(' from ')[0]} {b}" for w, b in kept.items()))
    lse = N * T * H * 4 if policy in KEEPS_LSE else 0
    assert total == N * T * D * PER_TOKEN_D[policy] + lse + N * per_example, kept
    assert not any(remat.ATTN_PROBS in w for w in kept)  # the (N, H, T, T) probabilities are recomputed


def test_none_keeps_far_more_including_the_probabilities():
    kept = kept_bytes("none")
    assert any(remat.ATTN_PROBS in w for w in kept)
    assert sum(kept.values()) > 3 * N * T * D * PER_TOKEN_D["save_dots"]


def test_float32_compute_keeps_float32_matmul_outputs():
    assert sum(kept_bytes("save_dots", jnp.float32).values()) == N * T * D * (4 + 4 * 10) + N * T * H * 4 + N * 6 * D * 4


@pytest.mark.parametrize("policy, scan_blocks", [(p, True) for p in remat.POLICIES if p != "none"]
                         + [("save_dots", False)])
def test_policy_same_loss_and_grads_as_none(policy, scan_blocks):
    """Tolerance 1e-6 (float32): the same operations, some of them computed a second time. The programs are
    tests/small_dit_gradients.py's (test_model_scan compares the same ones, scanned against unrolled)."""
    (l0, _, g0), (l1, _, g1) = loss_out_grads("none", scan_blocks), loss_out_grads(policy, scan_blocks)
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    errs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel_err, g1, g0))
    print(f"\n{policy}: worst gradient leaf rel_err={max(errs):.2e}")
    assert max(errs) <= 1e-6
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g0["blocks"]))  # every block used


def test_unknown_policy_and_conflicting_alias():
    with pytest.raises(ValueError, match=r"unknown remat_policy 'save_everything'.*save_dots"):
        DiT(depth=1, hidden_size=64, num_heads=4, input_size=8, remat_policy="save_everything").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    assert remat.resolve("none", remat=True) == "full"  # the older boolean
    with pytest.raises(ValueError, match="conflicts"):
        remat.resolve("save_dots", remat=True)


def test_config_default_by_platform_and_alias():
    c = tiny_config()
    assert c.model.remat_policy is None
    assert build.build_model(c, "cpu").remat_policy == "none"
    assert build.build_model(c, "tpu").remat_policy == "save_qkv_proj"
    assert build.build_model(c, "gpu").remat_policy == "save_dots"
    c.model.remat_policy = "save_qkv_proj"
    assert build.build_model(c, "tpu").remat_policy == "save_qkv_proj"
    c.model.remat_policy = "bogus"
    with pytest.raises(ConfigError, match=r"config.model.remat_policy='bogus'; expected one of"):
        build.build_model(c, "tpu")
    c.model.remat_policy, c.model.remat = None, True  # the older boolean: "full"
    assert build.build_model(c, "tpu").remat_policy == "full"
    c.model.remat_policy = "save_dots"
    with pytest.raises(ConfigError, match=r"config.model.remat=True .* conflicts with config.model.remat_policy"):
        build.build_model(c, "tpu")


@pytest.mark.slow
def test_rounding_the_parameters_to_the_compute_dtype_is_exact():
    """block_step rounds each block's float32 parameters to bfloat16 precision before the layers cast them
    (so that XLA cannot hoist one cast of all the stacked parameters out of the loop): the same bits as the
    plain cast, in the outputs and in the parameters' gradients."""
    block = DiT(hidden_size=D, num_heads=H, dtype=jnp.bfloat16).block()
    r = np.random.default_rng(0)
    h, c = jnp.asarray(r.standard_normal((N, T, D)), jnp.float32), jnp.asarray(r.standard_normal((N, D)), jnp.float32)
    # N(0, 0.05) on the init's shapes: every layer non-zero (the release init zeroes adaLN), no init to run
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.05 * r.standard_normal(s.shape), jnp.float32),
                                    jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), h, c)["params"]))

    def plain(h, p):  # the same checkpointed block without the rounding
        return remat.checkpoint_block(lambda h, p: (block.apply({"params": p}, h, c), None), "save_dots")(h, p)[0]

    def stepped(h, p):
        return block_step(block, c, "save_dots")(h, p)[0]

    def out_and_grads(f):  # one program per path: the output and the gradients of sum(output^2)
        def loss(p):
            out = f(h, p)
            return jnp.sum(out ** 2), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grads

    for f in (plain, stepped):
        assert jnp.dtype(jax.eval_shape(f, h, params).dtype) == jnp.float32
    (out_step, g_step), (out_plain, g_plain) = out_and_grads(stepped), out_and_grads(plain)
    np.testing.assert_array_equal(out_step, out_plain)
    for a, b in zip(jax.tree_util.tree_leaves(g_step), jax.tree_util.tree_leaves(g_plain)):
        np.testing.assert_array_equal(a, b)
