"""The model's attention (head-major matmuls with a hand-written backward) against independent references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.model import DiT, init_params
from dit_jax import model_ops
from dit_jax.model_ops import head_major_attention, recomputing_attention
from conftest import rel_err

N, H, T, DH = 2, 3, 16, 8


def _qkv(seed=0, dtype=jnp.float32):
    rs = np.random.RandomState(seed)
    return [jnp.asarray(2.0 * rs.randn(N, H, T, DH), dtype) for _ in range(3)]  # each (N, H, T, Dh)


def _reference_np(q, k, v):
    """float64 NumPy softmax(q k^T / sqrt(Dh)) v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(DH)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _reference_jax(q, k, v):
    """Plain softmax formula; its gradients come from JAX's autodiff."""
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), precision="highest") / np.sqrt(DH)
    return jnp.matmul(jax.nn.softmax(logits, axis=-1), v, precision="highest")


def test_forward_matches_float64_reference():
    q, k, v = _qkv()
    assert rel_err(head_major_attention(q, k, v), _reference_np(q, k, v)) < 1e-6


def test_forward_matches_jax_dot_product_attention():
    q, k, v = _qkv(1)
    to_nthd = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
    want = jax.nn.dot_product_attention(to_nthd(q), to_nthd(k), to_nthd(v), implementation="xla")
    assert rel_err(to_nthd(head_major_attention(q, k, v)), want) < 1e-6


def test_gradients_match_autodiff_of_the_softmax_formula():
    q, k, v = _qkv(2)
    w = jnp.asarray(np.random.RandomState(3).randn(N, H, T, DH), jnp.float32)  # a non-uniform cotangent

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    got = jax.grad(loss(head_major_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference_jax), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 1e-5, name


def test_bfloat16_stays_close_to_float32():
    q, k, v = _qkv(4)
    out = head_major_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), _reference_np(q, k, v)) < 3e-2
    g = jax.grad(lambda q: jnp.sum(head_major_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
                                   .astype(jnp.float32)))(q.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def _tiny_model(**kw):
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=5, **kw)


@pytest.mark.slow
def test_model_default_equals_dot_product_attention_path():
    """attention_impl None (head-major) vs "xla" (jax.nn.dot_product_attention): same outputs and gradients."""
    model = _tiny_model()
    params = init_params(model, jax.random.PRNGKey(0))
    # non-zero adaLN and output layers, so attention reaches the output
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 4))
    t, y = jnp.array([1, 500, 999]), jnp.array([0, 3, 4])

    def loss(m):
        return lambda p: jnp.sum(m.apply({"params": p}, x, t, y) ** 2)

    xla = model.clone(attention_impl="xla")
    assert rel_err(model.apply({"params": params}, x, t, y), xla.apply({"params": params}, x, t, y)) < 1e-5
    g_new, g_xla = jax.grad(loss(model))(params), jax.grad(loss(xla))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_new), jax.tree_util.tree_leaves(g_xla)):
        assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)


def test_unknown_attention_impl_is_named():
    model = _tiny_model(attention_impl="flash")
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        init_params(model, jax.random.PRNGKey(0))


def test_recomputing_attention_same_outputs_and_gradients(monkeypatch):
    """The variant the remat policies use (keeps the rows' log-sum-exp, recomputes the probabilities in the
    backward pass, over groups of heads): outputs equal head_major_attention's, gradients autodiff's (1e-5),
    the same with one head per step (what 512 px gets) as with all heads at once."""
    q, k, v = _qkv(5)
    w = jnp.asarray(np.random.RandomState(6).randn(N, H, T, DH), jnp.float32)

    def grads(f):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    want = grads(_reference_jax)
    assert rel_err(recomputing_attention(q, k, v), head_major_attention(q, k, v)) == 0
    for elements in (model_ops.ATTENTION_CHUNK_ELEMENTS, T * T):  # all 3 heads in one step; one head a step
        monkeypatch.setattr(model_ops, "ATTENTION_CHUNK_ELEMENTS", elements)
        assert model_ops._heads_per_step(H, T, T) == (H if elements > T * T * H else 1)
        assert rel_err(jax.jit(recomputing_attention)(q, k, v), head_major_attention(q, k, v)) < 1e-6
        for name, a, b in zip("qkv", grads(jax.jit(recomputing_attention)), want):
            assert rel_err(a, b) < 1e-5, (name, elements)
