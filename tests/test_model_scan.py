"""DiT(scan_blocks=True) (one lax.scan over the blocks) equals the unrolled blocks: outputs and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from dit_jax.model import DiT, init_params

TOL = 1e-5  # float32; the two paths run the same ops in the same order, only the loop structure differs


def _tiny(**kw):
    return DiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10, **kw)


def _inputs():
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32)  # (N, H, W, C)
    return x, jnp.asarray([3, 700], jnp.int32), jnp.asarray([1, 10], jnp.int32)


def _nonzero_params(model):
    # Release init zeroes adaLN and the output layer, which would hide most of the blocks: perturb everything.
    params = init_params(model, jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scan_matches_unrolled(remat):
    scan, unrolled = _tiny(remat=remat, scan_blocks=True), _tiny(remat=remat, scan_blocks=False)
    params = _nonzero_params(unrolled)
    x, t, y = _inputs()

    def loss(model, p):
        out = model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(jnp.square(out)), out

    (l_s, out_s), g_s = jax.value_and_grad(lambda p: loss(scan, p), has_aux=True)(params)
    (l_u, out_u), g_u = jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True)(params)
    assert rel_err(out_s, out_u) <= TOL
    assert jax.tree_util.tree_structure(g_s) == jax.tree_util.tree_structure(g_u)
    for a, b in zip(jax.tree_util.tree_leaves(g_s), jax.tree_util.tree_leaves(g_u)):
        assert rel_err(a, b) <= TOL


def test_scan_keeps_parameter_names():
    scan, unrolled = _tiny(scan_blocks=True), _tiny(scan_blocks=False)
    p_s, p_u = init_params(scan, jax.random.PRNGKey(0)), init_params(unrolled, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(p_s) == jax.tree_util.tree_structure(p_u)
    assert {f"blocks_{i}" for i in range(3)} <= set(p_s)


def _count_scans(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count(" scan[")


def test_train_flag_does_not_choose_the_block_structure():
    """A training step written with train=False differentiates the blocks through the same lax.scan as
    train=True (issue 13: it used to unroll them, a 2x slower backward on CPU)."""
    model = _tiny()  # default scan_blocks
    params = _nonzero_params(model)
    x, t, y = _inputs()

    def grads(train):
        def loss(p):
            rngs = {"dropout": jax.random.PRNGKey(2)} if train else None
            return jnp.mean(jnp.square(model.apply({"params": p}, x, t, y, train=train, rngs=rngs)))
        return jax.grad(loss)

    with_dropout, without = _count_scans(grads(True), params), _count_scans(grads(False), params)
    assert with_dropout == without >= 2, (with_dropout, without)  # the forward scan and its transpose
    # The samplers' forward runs the blocks unrolled (faster for a forward alone).
    from dit_jax.guidance import dit_model_fn

    assert _count_scans(lambda p: model.apply({"params": p}, x, t, y), params) == 1
    assert _count_scans(lambda p: dit_model_fn(model, p, y)(x, t), params) == 0
