"""DiT(scan_blocks=True) (one lax.scan over the blocks) equals the unrolled blocks: outputs and gradients; the
blocks' parameters are stacked, and no program copies them."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import small_dit_gradients
from conftest import rel_err
from dit_jax.model import DiT, abstract_params, init_params

TOL = 1e-5  # float32; the two paths run the same ops in the same order, only the loop structure differs


def _tiny(**kw):
    return DiT(**small_dit_gradients.KW, **kw)


@pytest.mark.parametrize("policy", ["none", "full", "save_dots"])
def test_scan_matches_unrolled(policy):
    """The same parameters through the scanned and the unrolled blocks: outputs and every gradient (jitted,
    tests/small_dit_gradients.py: the programs test_remat_policies compares too)."""
    _, out_s, g_s = small_dit_gradients.loss_out_grads(policy, True)
    _, out_u, g_u = small_dit_gradients.loss_out_grads(policy, False)
    assert rel_err(out_s, out_u) <= TOL
    assert jax.tree_util.tree_structure(g_s) == jax.tree_util.tree_structure(g_u)
    for a, b in zip(jax.tree_util.tree_leaves(g_s), jax.tree_util.tree_leaves(g_u)):
        assert rel_err(a, b) <= TOL


def test_blocks_parameters_are_stacked_the_same_either_way():
    scan, unrolled = _tiny(scan_blocks=True), _tiny(scan_blocks=False)
    p_s, p_u = abstract_params(scan), abstract_params(unrolled)  # the init's shapes, nothing computed
    assert jax.tree_util.tree_structure(p_s) == jax.tree_util.tree_structure(p_u)
    assert not [k for k in p_s if k.startswith("blocks_")]
    assert p_s["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 192)  # (depth, D, 3D)
    assert {x.shape[0] for x in jax.tree_util.tree_leaves(p_s["blocks"])} == {3}


def _stacking_ops(hlo: str, depth: int) -> list:
    """Instructions of an optimized HLO module that build a (depth, ...) float32 array by concatenation."""
    return re.findall(rf"= f32\[{depth},[0-9,]+\]\{{[^}}]*\}} concatenate\(", hlo)


@pytest.mark.parametrize("policy", ["none", "save_dots"])
def test_gradient_program_copies_no_parameters(policy):
    """Issue 21: the step used to stack the blocks' parameters on every call (a copy of them, and of their
    gradients on the way back). With a batch of one example the activations are small, so the compiled
    gradient's temporaries must be well under the blocks' parameters; they were 2.3x them."""
    model = DiT(input_size=8, patch_size=2, hidden_size=256, depth=8, num_heads=4, num_classes=10,
                remat_policy=policy)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    x, t, y = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    compiled = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, y))))).lower(
        params).compile()
    block_bytes = sum(int(np.prod(a.shape)) * 4 for a in jax.tree_util.tree_leaves(params["blocks"]))
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"\n{policy}: temporaries {temp / block_bytes:.2f} x the blocks' parameters")
    assert not _stacking_ops(compiled.as_text(), 8)
    # "none" keeps the adaLN kernel's <= 128-row slices of chunked_dot_general (half the block parameters).
    assert temp < (0.7 if policy == "none" else 0.25) * block_bytes


def _count_scans(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count(" scan[")


def test_train_flag_does_not_choose_the_block_structure():
    """A training step written with train=False differentiates the blocks through the same lax.scan as
    train=True (issue 13: it used to unroll them, a 2x slower backward on CPU)."""
    model = _tiny()  # default scan_blocks
    params = small_dit_gradients.params()
    x, t, y = small_dit_gradients.inputs()

    def grads(train):
        def loss(p):
            rngs = {"dropout": jax.random.PRNGKey(2)} if train else None
            return jnp.mean(jnp.square(model.apply({"params": p}, x, t, y, train=train, rngs=rngs)))
        return jax.grad(loss)

    with_dropout, without = _count_scans(grads(True), params), _count_scans(grads(False), params)
    assert with_dropout == without >= 2, (with_dropout, without)  # the forward scan and its transpose
    # The samplers' forward runs the same scan (as fast as a loop over the blocks for a forward alone, and one
    # block to compile); scan_blocks=False gives the loop.
    from dit_jax.guidance import dit_model_fn

    assert _count_scans(lambda p: model.apply({"params": p}, x, t, y), params) == 1
    assert _count_scans(lambda p: dit_model_fn(model, p, y)(x, t), params) == 1
    assert _count_scans(lambda p: dit_model_fn(model.clone(scan_blocks=False), p, y)(x, t), params) == 0
