"""Model options: remat, bfloat16 compute, and the release's initialisation rules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from dit_jax.model import DiT, DiT_models, abstract_params, init_params


def small(**kw):
    """A DiT small enough to compile in a second or two; the options under test do not depend on size."""
    return DiT(**{**dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10), **kw})


def init(model, seed=0):
    return jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(seed))


def perturbed(model, seed=0, std=0.05):
    r = np.random.default_rng(seed)  # NumPy noise: no per-shape compilation
    return jax.tree_util.tree_map(lambda a: np.asarray(a) + std * r.standard_normal(a.shape).astype(np.float32),
                                  jax.device_get(init(model, seed)))


def random_params(model, seed=0, std=0.05):
    """Every leaf from N(0, std), on the shapes init would give (no init compile)."""
    r = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: std * r.standard_normal(a.shape).astype(np.float32), abstract_params(model))


def data(model, n=2, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, model.input_size, model.input_size, model.in_channels)).astype(np.float32)
    return x, np.array([5, 800][:n], np.int32), np.array([1, 7][:n], np.int32)


def test_remat_same_outputs_and_grads():
    """Tolerance: rel_err <= 1e-6 for outputs and every gradient leaf (same maths, recomputed)."""
    base, remat = small(), small(remat=True)
    params = random_params(base)  # any non-degenerate weights: remat must not change a bit of the maths
    x, t, y = data(base)

    def loss_and_grad(model):
        def loss(p):
            out = model.apply({"params": p}, x, t, y)
            return jnp.mean(jnp.square(out)), out

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    ga, out_a = loss_and_grad(base)
    gb, out_b = loss_and_grad(remat)
    assert rel_err(out_b, out_a) <= 1e-6
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel_err, gb, ga)))
    print(f"\nremat grads worst leaf rel_err={worst:.2e}")
    assert worst <= 1e-6
    assert float(np.abs(np.asarray(ga["blocks"]["adaLN_modulation_1"]["kernel"][0])).max()) > 0


def test_bfloat16_compute_runs_and_is_close():
    """Loose tolerance: bf16 matmuls (8-bit mantissa) vs float32, rel_err <= 5e-2; params stay float32."""
    f32, bf16 = small(hidden_size=128), small(hidden_size=128, dtype=jnp.bfloat16)
    params = perturbed(f32, std=0.02)
    x, t, y = data(f32)
    ref = jax.jit(lambda p: f32.apply({"params": p}, x, t, y))(params)
    out = jax.jit(lambda p: bf16.apply({"params": p}, x, t, y))(params)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    err = rel_err(out, ref)
    print(f"\nbfloat16 vs float32 rel_err={err:.2e}")
    assert 0 < err <= 5e-2
    # The dtypes init returns, from its trace (jax.eval_shape: the same program's output types, no compile).
    bf16_params = jax.eval_shape(lambda k: init_params(bf16, k), jax.random.PRNGKey(0))
    assert {p.dtype for p in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.float32)}


def xavier_bound(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_init_matches_release_rules():
    model = DiT_models["DiT-S/2"](depth=2, input_size=32)
    p = jax.device_get(init(model))
    d = 384
    # adaLN-Zero: every modulation and the output layer start at zero, so each block starts as identity.
    for leaf in p["blocks"]["adaLN_modulation_1"].values():  # (depth, ...): every block
        assert leaf.shape[0] == 2 and not np.any(leaf)
    for sub in ("adaLN_modulation_1", "linear"):
        for leaf in p["final_layer"][sub].values():
            assert not np.any(leaf)
    # normal(0.02) label table (with the null row) and timestep MLP weights; zero biases.
    table = p["y_embedder"]["embedding_table"]["embedding"]
    assert table.shape == (1001, d) and abs(table.std() - 0.02) < 0.001 and abs(table.mean()) < 0.001
    for name in ("mlp_0", "mlp_2"):
        assert abs(p["t_embedder"][name]["kernel"].std() - 0.02) < 0.002
        assert not np.any(p["t_embedder"][name]["bias"])
    # xavier-uniform linears: inside the bound, and its variance bound^2 / 3.
    for path, fan_in, fan_out in (("attn/qkv", d, 3 * d), ("attn/proj", d, d), ("mlp/fc1", d, 4 * d),
                                  ("mlp/fc2", 4 * d, d)):
        a, b = path.split("/")
        k = p["blocks"][a][b]["kernel"][1]  # block 1
        bound = xavier_bound(fan_in, fan_out)
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.98 * bound, path
        assert abs(k.std() - bound / math.sqrt(3)) < 0.02 * bound, path
        assert not np.any(p["blocks"][a][b]["bias"])
        # Each block draws its own values (the stacked init splits the rng over the depth axis).
        assert not np.allclose(p["blocks"][a][b]["kernel"][0], k), path
    # Patch projection: xavier over the flattened (C * p * q) fan-in, like the release's w.view(D, -1).
    k = p["x_embedder"]["kernel"]  # (p, q, C, D)
    assert k.shape == (2, 2, 4, d)
    bound = xavier_bound(2 * 2 * 4, d)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    assert not np.any(p["x_embedder"]["bias"])
    # The release init makes the whole network output zero at the start.
    x, t, y = data(model)
    assert not np.any(np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, t, y))(p)))


def test_bad_shapes_are_named():
    model = small(input_size=16, depth=1)
    params = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(model))  # no init compile
    with pytest.raises(ValueError, match="spatial size 16"):
        model.apply({"params": params}, np.zeros((1, 8, 8, 4), np.float32), np.zeros(1), np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="4 input channels"):
        model.apply({"params": params}, np.zeros((1, 16, 16, 3), np.float32), np.zeros(1), np.zeros(1, np.int32))
