"""The Flax FID Inception against pytorch-fid's own InceptionV3, same random weights (convert.reference.pytorch_fid).

Tolerance: relative error (max |a - b| / max |b|) <= 1e-4 in float32 for pool_3, the 1008 logits and ADM's
spatial features, on uint8 images of 32, 256 and 299 px (2 images each; measured ~1e-6). The weights go
through the converter (BatchNorm folding, OIHW -> HWIO), and pytorch-fid loads the random state dict with
strict=True, so the converter's key table is checked as well.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.evaluation.inception import InceptionV3, inception_forward
from conftest import rel_err

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread_references")]  # conftest

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    try:
        from convert.reference.pytorch_fid import TorchInception

        return TorchInception(seed=0)
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def params(ref):
    return jax.tree_util.tree_map(jnp.asarray, ref.flax_params())


def _images(size, n=2, seed=0):
    return np.random.default_rng(seed + size).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ref_of(ref):
    """ref_of(size): pytorch-fid's outputs for _images(size), computed once per module (float32 and bf16 tests)."""
    return functools.lru_cache(maxsize=None)(lambda size: ref(_images(size)))


@pytest.mark.parametrize("size", [32, 256, 299])
def test_float32_parity(ref_of, params, size):
    images = _images(size)
    want = ref_of(size)
    got = jax.device_get(jax.jit(lambda p, x: InceptionV3().apply({"params": p}, x))(params, images))
    for k in ("pool", "logits", "spatial"):
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= TOL, (k, size, rel_err(got[k], want[k]))
    np.testing.assert_allclose(got["logits_unbiased"], got["logits"] - np.asarray(params["fc"]["bias"]),
                               rtol=0, atol=1e-5)


def test_unfused_parity_non_square(ref, params):
    """The unfused layers (one convolution per PyTorch layer), on a non-square input."""
    images = np.random.default_rng(5).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    want = ref(images)
    got = jax.device_get(jax.jit(lambda p, x: inception_forward(p, x, fuse=False))(params, images))
    for k in ("pool", "logits", "spatial"):
        assert rel_err(got[k], want[k]) <= TOL, k


@pytest.mark.slow
def test_bfloat16_close(ref_of, params):
    """bf16 compute: pool_3 within 5% (relative to its largest value) of float32; not a parity claim."""
    images = _images(32)
    want = ref_of(32)
    got = jax.device_get(jax.jit(lambda p, x: inception_forward(p, x, dtype=jnp.bfloat16))(params, images))
    assert got["pool"].dtype == np.float32
    assert rel_err(got["pool"], want["pool"]) <= 5e-2


def test_init_matches_converted_tree(params):
    """The module's own initializer builds the same tree (names and shapes) the converter produces."""
    init = jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8)))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, init["params"])
    assert shapes == jax.tree_util.tree_map(lambda a: a.shape, params)


def test_feature_extractor_parity(ref, params):
    """As dit-jax-eval runs it: FeatureExtractor (head kernels fused once, dit_jax's XLA:CPU options)."""
    from dit_jax.evaluation.features import FeatureExtractor

    images = _images(256, n=3)
    want = ref(images)
    got = FeatureExtractor(params, per_device_batch=4)(images)
    assert rel_err(got["pool"], want["pool"]) <= TOL
    assert rel_err(got["spatial"], want["spatial"]) <= TOL
    assert rel_err(got["logits_unbiased"], want["logits"] - np.asarray(params["fc"]["bias"])) <= TOL


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_pools_match_reduce_window(layout):
    """The slice-based pools against lax.reduce_window: max exactly, the padding-excluded average to 1e-6."""
    from dit_jax.evaluation.inception import _avg_pool_excl, _max_pool

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 11, 5)), jnp.float32)  # odd sizes
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    sp = (1, 2) if layout == "NHWC" else (2, 3)

    def window(k, s, pad):
        dims, strides, pads = [1] * 4, [1] * 4, [(0, 0)] * 4
        for a in sp:
            dims[a], strides[a], pads[a] = k, s, (pad, pad)
        return dims, strides, pads

    cases = [(2, False), (1, True), (1, False)]

    @jax.jit  # every pool and its reference in one program (instead of one eager compile per operation)
    def pools(x):
        maxima = [(_max_pool(x, stride, same, layout),
                   jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, *window(3, stride, 1 if same else 0)))
                  for stride, same in cases]
        sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window(3, 1, 1))
        counts = jax.lax.reduce_window(jnp.ones_like(x), 0.0, jax.lax.add, *window(3, 1, 1))
        return maxima, (_avg_pool_excl(x, layout), sums / counts)

    maxima, (avg, want_avg) = pools(x)
    for got, want in maxima:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(avg, want_avg, rtol=0, atol=1e-6)
