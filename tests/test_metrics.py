"""FID/sFID, Inception Score, precision/recall and statistics against references on fixed features.

- Fréchet distance vs pytorch-fid's calculate_frechet_distance (scipy sqrtm): relative error <= 1e-6, on
  well-conditioned and on rank-deficient covariances (fewer samples than dimensions).
- Inception Score, precision/recall: NumPy transcriptions of ADM's evaluator.py written below (loops,
  blocks, float16 distances with the per-block float32 fallback, np.partition for the k-NN radius).
  IS: relative error <= 1e-12. Precision/recall: exactly equal on integer features (every distance exact in
  float16, so ties at the radius are decided identically), within 2/N on continuous features.
- statistics: vs np.mean / np.cov, relative error <= 1e-12.
"""
import numpy as np
import pytest

from dit_jax.evaluation import metrics as M
from conftest import rel_err

# ------------------------------------------------------------------ NumPy transcriptions of ADM's code


def adm_statistics(acts):
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def adm_inception_score(logits, split_size=5000):
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)  # ADM: tf.nn.softmax(pool3 @ W)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _pairwise(u, v):
    nu = np.sum(np.square(u), 1).reshape(-1, 1)
    nv = np.sum(np.square(v), 1).reshape(1, -1)
    return np.maximum(nu - 2 * u @ v.T + nv, 0.0)


def adm_distance_block(u, v):
    """DistanceBlock: float16 inputs and result, float32 for the whole block if anything is not finite."""
    u16, v16 = u.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        n16 = np.concatenate([np.sum(u16 ** 2, 1), np.sum(v16 ** 2, 1)]).astype(np.float16)
        d16 = _pairwise(u16, v16).astype(np.float16)
    if np.isfinite(n16).all() and np.isfinite(d16).all():
        return d16.astype(np.float32)
    return _pairwise(u.astype(np.float64), v.astype(np.float64)).astype(np.float32)


def adm_radii(features, k=3, batch=10000):
    n = len(features)
    radii = np.zeros([n], np.float32)
    dist = np.zeros([batch, n], np.float32)
    for b1 in range(0, n, batch):
        e1 = min(b1 + batch, n)
        for b2 in range(0, n, batch):
            e2 = min(b2 + batch, n)
            dist[0:e1 - b1, b2:e2] = adm_distance_block(features[b1:e1], features[b2:e2])
        radii[b1:e1] = np.partition(dist[0:e1 - b1], np.arange(k + 1), axis=1)[:, k]
    return radii


def adm_precision_recall(ref, samples, k=3, batch=10000):
    r1, r2 = adm_radii(ref, k, batch), adm_radii(samples, k, batch)
    s1 = np.zeros(len(ref), bool)
    s2 = np.zeros(len(samples), bool)
    for b1 in range(0, len(ref), batch):
        for b2 in range(0, len(samples), batch):
            d = adm_distance_block(ref[b1:b1 + batch], samples[b2:b2 + batch])
            s1[b1:b1 + batch] |= np.any(d <= r2[None, b2:b2 + batch], axis=1)
            s2[b2:b2 + batch] |= np.any(d <= r1[b1:b1 + batch, None], axis=0)
    return float(s2.mean()), float(s1.mean())


# ----------------------------------------------------------------------------------- Fréchet distance


def _cov_pair(rng, dim, n):
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim)
    b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + 0.3
    (m1, s1), (m2, s2) = adm_statistics(a), adm_statistics(b)
    return m1, s1, m2, s2


@pytest.mark.parametrize("dim,n", [(64, 1000), (128, 40), (256, 100)], ids=["well-conditioned", "rank-39", "rank-99"])
def test_frechet_distance_matches_pytorch_fid(rng, dim, n):
    """Tolerance: relative error <= 1e-6 against scipy's sqrtm-based FID (pytorch-fid's code)."""
    from convert.reference.pytorch_fid import load_fid_score

    try:
        fid_score = load_fid_score()
    except ImportError as e:
        pytest.skip(str(e))
    m1, s1, m2, s2 = _cov_pair(rng, dim, n)
    if n < dim:
        assert np.linalg.matrix_rank(s1) == n - 1  # really rank-deficient
    want = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    got = M.frechet_distance(m1, s1, m2, s2)
    assert abs(got - want) / abs(want) <= 1e-6, (got, want)


def test_frechet_distance_of_identical_statistics_is_zero(rng):
    m1, s1, _, _ = _cov_pair(rng, 64, 30)  # rank-deficient: sqrt(S S) = S must still come out
    assert abs(M.frechet_distance(m1, s1, m1, s1)) <= 1e-9 * np.trace(s1)


def test_frechet_distance_shape_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- IS, statistics, P/R


@pytest.mark.parametrize("n,split", [(30, 5000), (23, 5)], ids=["one-split", "five-splits"])
def test_inception_score_matches_adm(rng, n, split):
    """Tolerance: relative error <= 1e-12 against the NumPy transcription (both float64)."""
    logits = rng.normal(0, 3, (n, 1008)).astype(np.float32)
    assert rel_err(M.inception_score(logits, split), adm_inception_score(logits, split)) <= 1e-12


def test_inception_score_default_split_is_adm():
    assert M.IS_SPLIT_SIZE == 5000 and M.PR_NEIGHBOURS == 3 and M.PR_BLOCK == 10000


def test_statistics_match_numpy(rng):
    """Tolerance: relative error <= 1e-12 against np.mean / np.cov(rowvar=False) in float64. (ADM's np.mean of
    float32 activations is a float32 mean, 1e-7 off; the mean here is float64 like np.cov.)"""
    acts = (rng.normal(size=(50, 40)) * 3 + 1).astype(np.float32)
    mu, sigma = M.statistics(acts)
    m_ref, s_ref = adm_statistics(acts.astype(np.float64))
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert rel_err(mu, m_ref) <= 1e-12 and rel_err(sigma, s_ref) <= 1e-12
    assert rel_err(mu, np.mean(acts, axis=0)) <= 1e-6  # ADM's float32 mean


@pytest.mark.parametrize("block,jitter", [(10000, 0.0), (7, 0.0), (10000, 1e-4)],
                         ids=["adm-blocks", "small-blocks", "jitter-below-float16"])
def test_precision_recall_exact_on_integer_features(rng, block, jitter):
    """Integer features: every distance is exact in float16 and float32, so the result must be identical.
    With jitter 1e-4 on values 1..3, rounding the features to float16 removes it: the ties at the radius that
    ADM's float16 distances create must be kept (float32 distances would break them)."""
    ref = rng.integers(1, 4, (40, 24)).astype(np.float32)
    samples = rng.integers(1, 4, (33, 24)).astype(np.float32) + (rng.random((33, 24)) < 0.1)
    ref += rng.uniform(-jitter, jitter, ref.shape).astype(np.float32)
    samples += rng.uniform(-jitter, jitter, samples.shape).astype(np.float32)
    want = adm_precision_recall(ref, samples, batch=block)
    assert 0.0 < want[0] < 1.0 or 0.0 < want[1] < 1.0  # not a trivial case
    assert M.precision_recall(ref, samples, block=block) == want
    np.testing.assert_array_equal(M.manifold_radii(ref, block=block), adm_radii(ref, batch=block))


@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["float16-path", "float32-fallback"])
def test_precision_recall_continuous_features(rng, scale):
    """Tolerance: within 2/N of ADM's fractions (float16 rounding of float32 vs float64 sums may flip a
    distance that sits on a rounding boundary). scale 40 makes |x|^2 overflow float16: the float32 path."""
    ref = (rng.normal(size=(120, 32)) * scale).astype(np.float32)
    samples = (rng.normal(size=(100, 32)) * scale * 1.1 + 0.2 * scale).astype(np.float32)
    want = adm_precision_recall(ref, samples)
    got = M.precision_recall(ref, samples)
    assert abs(got[0] - want[0]) <= 2 / len(samples) and abs(got[1] - want[1]) <= 2 / len(ref), (got, want)
    assert 0.05 < want[0] < 0.95 and 0.05 < want[1] < 0.95


def test_manifold_needs_k_plus_one_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        M.manifold_radii(np.zeros((3, 5), np.float32))
