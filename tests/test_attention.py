"""The model's attention kernels (dit_jax/nn/attention.py) against independent references and each other, and the
"auto" choice per platform."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import default
from dit_jax import topology
from dit_jax.nn import attention
from dit_jax.model import DiT, abstract_params
from dit_jax.nn import model_ops
from dit_jax.nn.model_ops import head_major_attention, recomputing_attention
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


def _model_256(impl):
    """A one-block DiT on 32x32 latents with patch 2: 256 tokens, two of the Pallas kernel's 128-token tiles."""
    return DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5,
               attention_impl=impl)


@functools.lru_cache(maxsize=None)
def _model_out_and_grads(impl):
    """(output, gradients of sum(output^2)) of _model_256(impl) on fixed inputs, one jitted program per impl
    (the Pallas kernel in interpret mode); the "matmul" reference is compiled once for the tests below."""
    # N(0, 0.05) on the init's shapes (NumPy: no init to run): no zero layer (the release init zeroes adaLN and
    # the output layer), so attention reaches the output
    r = np.random.default_rng(1)
    model = _model_256(impl)
    params = jax.tree_util.tree_map(lambda s: (0.05 * r.standard_normal(s.shape)).astype(np.float32),
                                    abstract_params(model))
    x = r.standard_normal((2, 32, 32, 4)).astype(np.float32)  # (N, H, W, C)
    t, y = np.array([3, 900]), np.array([1, 4])

    def loss(p):
        out = model.apply({"params": p}, x, t, y)
        return jnp.sum(out ** 2), out

    with attention.pallas_interpret():
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads


def _model_grads_match(impl, tol):
    """The output and every gradient with attention `impl` against the "matmul" kernel's."""
    (out_ref, g_ref), (out, grads) = _model_out_and_grads("matmul"), _model_out_and_grads(impl)
    assert rel_err(out, out_ref) < tol
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(g_ref)):
        assert rel_err(a, b) < tol, jax.tree_util.keystr(path)


def test_model_default_equals_dot_product_attention_path():
    """attention_impl "matmul" (head-major) vs "xla" (jax.nn.dot_product_attention): same outputs and gradients."""
    _model_grads_match("xla", 1e-5)


def test_unknown_attention_impl_is_named():
    model = _tiny_model(attention_impl="flash")
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'; use one of auto, matmul, xla, cudnn"):
        abstract_params(model)  # the init traced (eval_shape): the error comes before anything is computed


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


# ----------------------------------------------------------------------------------------------------
# The kernels of dit_jax/nn/attention.py on (N, T, H, Dh), each against "matmul"
# ----------------------------------------------------------------------------------------------------
def _nthd(shape=(2, 128, 2, 72), seed=5):
    rs = np.random.RandomState(seed)
    return [jnp.asarray(rs.randn(*shape), jnp.float32) for _ in range(4)]  # q, k, v, a cotangent


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_kernel_equals_matmul_forward_and_gradient(impl):
    """float32, T = 128 (the splash tile), Dh = 72 (DiT-XL's heads); the Pallas TPU kernel in interpret mode."""
    q, k, v, w = _nthd()

    def loss(name):
        return lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, name) * w)

    with attention.pallas_interpret():
        out = attention.dot_product_attention(q, k, v, impl)
        grads = jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
    assert rel_err(out, attention.dot_product_attention(q, k, v, "matmul")) < 2e-6
    for name, a, b in zip("qkv", grads, jax.grad(loss("matmul"), argnums=(0, 1, 2))(q, k, v)):
        assert rel_err(a, b) < 1e-5, name


def test_pallas_tpu_over_a_mesh_runs_per_device_and_equals_matmul():
    """Under a mesh the kernel runs in shard_map over the batch axes (8 simulated devices: data 4 x tensor 2,
    the heads over "tensor"); interpret mode, so on CPU."""
    q, k, v, w = _nthd((8, 128, 2, 16))
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    sh = NamedSharding(mesh, P("data"))
    q, k, v, w = (jax.device_put(a, sh) for a in (q, k, v, w))
    f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attention.pallas_tpu_attention(q, k, v) * w),
                                   argnums=(0, 1, 2)))
    with attention.pallas_interpret(), mesh:
        assert attention._device_spec(8, 2)[1] == P(("data",), "tensor", None, None)
        text = f.lower(q, k, v).as_text()
        (val, grads) = f(q, k, v)
    assert 'manual_axes={"data", "tensor"}' in text  # one shard_map over both axes: 2 examples x 1 head each
    ref = jax.value_and_grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, "matmul") * w),
                             argnums=(0, 1, 2))
    want_val, want_grads = ref(q, k, v)
    assert rel_err(val, want_val) < 1e-5
    for name, a, b in zip("qkv", grads, want_grads):
        assert rel_err(a, b) < 1e-5, name


def test_bfloat16_kernels_stay_close_to_float32_matmul():
    q, k, v, _ = _nthd((2, 128, 2, 64))
    want = attention.dot_product_attention(q, k, v, "matmul")
    with attention.pallas_interpret():
        for impl in ("matmul", "xla", "pallas_tpu"):
            out = attention.dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), impl)
            assert out.dtype == jnp.bfloat16
            assert rel_err(out.astype(jnp.float32), want) < 2e-2, impl


def test_model_with_pallas_tpu_equals_matmul():
    """The whole DiT (256 tokens) with the Pallas kernel (interpret mode): outputs and every gradient."""
    _model_grads_match("pallas_tpu", 1e-5)


# ----------------------------------------------------------------------------------------------------
# "auto"
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform,tokens,head_dim,dtype,want", [
    ("cpu", 1024, 72, jnp.bfloat16, "matmul"),
    ("gpu", 256, 72, jnp.bfloat16, "cudnn"),  # DiT-XL's 72-wide heads are a multiple of 8
    ("gpu", 256, 64, jnp.float16, "cudnn"),
    ("gpu", 256, 72, jnp.float32, "xla"),  # cuDNN flash attention is bf16/fp16 only
    ("gpu", 256, 160, jnp.bfloat16, "xla"),
    ("tpu", 1024, 72, jnp.bfloat16, "pallas_tpu"),  # 512 px
    ("tpu", 256, 72, jnp.bfloat16, "xla"),  # 256 px
    ("tpu", 1100, 72, jnp.bfloat16, "xla"),  # not a multiple of the 128-token tile
    ("rocm", 256, 64, jnp.bfloat16, "xla"),
])
def test_auto_resolves_per_platform(platform, tokens, head_dim, dtype, want):
    assert attention.resolve("auto", platform, tokens, head_dim, dtype) == want


def test_explicit_choices_are_kept():
    for impl in ("matmul", "xla", "cudnn", "pallas_tpu"):
        assert attention.resolve(impl, "cpu", 16, 8, jnp.float32) == impl
    assert attention.resolve(None, "gpu", 16, 8, jnp.bfloat16) == "matmul"  # None: the old default


def test_computation_platform_follows_the_mesh():
    assert attention.computation_platform() == "cpu"
    topo = topology.tpu_topology("v5e:2x2")  # compile-only TPU devices on this CPU machine
    with Mesh(np.asarray(topo.devices), ("data",)):
        assert attention.computation_platform() == "tpu"
    assert attention.computation_platform() == "cpu"


def test_auto_on_a_gpu_without_cudnn_falls_back_to_xla(caplog):
    """cuDNN cannot be traced here (no GPU): "auto" for a GPU program says so once and takes the XLA path."""
    q, k, v, _ = _nthd((1, 16, 2, 8))
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    with caplog.at_level(logging.WARNING, logger="dit_jax.nn.attention"):
        out = attention.dot_product_attention(q, k, v, "auto", platform="gpu")
    assert "cuDNN attention unavailable" in caplog.text and "using attention_impl='xla'" in caplog.text
    assert rel_err(out.astype(jnp.float32), jax.nn.dot_product_attention(q, k, v, implementation="xla")
                   .astype(jnp.float32)) == 0.0


def test_configs_and_model_default_to_auto():
    assert DiT().attention_impl == "auto" and default.get_config().model.attention_impl == "auto"


# ----------------------------------------------------------------------------------------------------
# The Pallas TPU kernel in the real training step, compiled for v5e (libtpu, compile-only)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v5e_steps():
    """benchmarks/attention_tpu's compile of the real training step (train.setup + train.jit_train_step +
    compile_report.compile_step, as --compile-only builds it) for v5e:2x2, attention "auto" and "xla": a
    DiT-S/2 at 512 px (1024 tokens) narrowed to 2 blocks of width 128 (2 heads of 64: the kernel's choice
    depends on the tokens, not the width; a narrow step compiles in half the time), batch 8. One compile per
    impl for this module: the product's rule and the benchmark's smoke run below read the same rows
    (libtpu's compile-only programs cannot be read back from the persistent compilation cache)."""
    from benchmarks import attention_tpu

    rows = attention_tpu.main(["--variants", "S/2,512", "--impls", "auto", "xla", "--topology", "v5e:2x2",
                               "--batch", "8", "--depth", "2", "--config.model.hidden_size=128",
                               "--config.model.num_heads=2"])
    return {r["attention_impl"]: r for r in rows}


@pytest.mark.slow
def test_auto_compiles_the_pallas_kernel_into_the_v5e_training_step_at_512px(v5e_steps):
    auto, xla = v5e_steps["auto"], v5e_steps["xla"]
    # the splash forward and its two backward kernels, in the scanned blocks' loop bodies (the count of
    # custom_call_target="tpu_custom_call" in the compiled HLO text)
    assert auto["pallas_kernels"] >= 3
    assert xla["pallas_kernels"] == 0
    assert auto["temp_gib"] < xla["temp_gib"]  # the (N, H, T, T) logits never reach HBM


@pytest.mark.slow
def test_attention_tpu_tiny(v5e_steps):
    """benchmarks/attention_tpu runs and reports its numbers (moved here from test_benchmarks_smoke.py to read
    the programs compiled above instead of compiling one more)."""
    for r in v5e_steps.values():
        assert r["tokens"] == 1024 and r["batch_per_chip"] == 2 and r["temp_gib"] > 0 and r["total_gib"] > 0
        assert r["bytes_accessed_gib"] > 0 and r["compile_cpu_s"] > 0
