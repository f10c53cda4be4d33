"""The sample-quality metrics with the definitions of ADM's evaluator (guided-diffusion evaluations/evaluator.py).

    mu, sigma = statistics(pool_features)                  # float64 mean and covariance (ddof=1, np.cov)
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)       # FID on pool_3, sFID on the spatial features
    is_ = inception_score(logits_unbiased)                 # softmax of pool_3 @ W (no bias), splits of 5000
    precision, recall = precision_recall(ref_pool, sample_pool)   # k=3 manifolds, 10000-row blocks

Fréchet distance: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the square root is
taken from the eigenvalues of the symmetric PSD matrix A S2 A, A = S1^(1/2) (eigh, negative rounding noise
set to 0), which has the same eigenvalues as S1 S2. No inverse is taken, so rank-deficient covariances
(fewer images than dimensions) are as stable as scipy's sqrtm of S1 S2, which ADM and pytorch-fid use
(tests/test_metrics.py checks the two against each other), and much faster for 2048 dimensions.

Precision/recall distances follow ADM's DistanceBlock: squared Euclidean distances computed from features
rounded to float16 and rounded to float16 themselves, unless a block has a non-finite value, in which case
that whole block is computed in float32. A point is inside a manifold if its distance to some reference
point is <= that point's radius (the distance to its k-th nearest neighbour, itself counted as the 0th).
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)
PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10000  # ADM's row_batch_size = col_batch_size = 10000
MIN_IMAGES = {"fid": 2, "sfid": 2, "inception_score": 1, "precision": PR_NEIGHBOURS + 1,
              "recall": PR_NEIGHBOURS + 1}  # a covariance needs 2 rows; a k-NN radius needs k others


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of (N, D) features, as ADM's compute_statistics (np.mean, np.cov rowvar=False)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"statistics need (N, D) features with N >= 2, got shape {x.shape}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = (xc.T @ xc) / (len(x) - 1)
    return mu, sigma


def _psd_eigenvalues_clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (|w| below dim * eps * max |w|) set to exactly 0."""
    floor = len(w) * np.finfo(np.float64).eps * max(float(np.max(np.abs(w))), 0.0)
    return np.where(w > floor, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_psd_eigenvalues_clean(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 (float64)."""
    a = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = a @ np.asarray(sigma2, np.float64) @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(_psd_eigenvalues_clean(w))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits).

    `logits` are ADM's: pool_3 @ W without the bias (InceptionV3's "logits_unbiased"). Computed in float64
    from log-softmax, so a probability that underflows contributes 0 instead of NaN."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"inception_score needs (N, classes) logits with N >= 1, got shape {logits.shape}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i:i + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = np.sum(p * (part - log_marginal), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------- precision and recall

_HP = jax.lax.Precision.HIGHEST


def _sq_dists(u, v):
    """Squared distances (|u|^2 - 2 u.v + |v|^2, clipped at 0) and whether every value is finite."""
    nu = jnp.sum(u * u, axis=1)[:, None]
    nv = jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(nu - 2.0 * jnp.dot(u, v.T, precision=_HP) + nv, 0.0)


@jax.jit
def distance_block(u: jax.Array, v: jax.Array) -> jax.Array:
    """ADM's DistanceBlock: float16 distances as float32, or float32 ones when the block has a non-finite value."""
    u16 = u.astype(jnp.float16).astype(jnp.float32)  # the rounded inputs; products and sums stay exact-ish
    v16 = v.astype(jnp.float16).astype(jnp.float32)
    nu = jnp.sum(u16 * u16, axis=1).astype(jnp.float16)
    nv = jnp.sum(v16 * v16, axis=1).astype(jnp.float16)
    d16 = _sq_dists(u16, v16).astype(jnp.float16)
    ok = jnp.all(jnp.isfinite(nu)) & jnp.all(jnp.isfinite(nv)) & jnp.all(jnp.isfinite(d16))
    return jax.lax.cond(ok, lambda: d16.astype(jnp.float32), lambda: _sq_dists(u, v))


@functools.partial(jax.jit, static_argnums=2)
def _block_smallest(u, v, k1: int):
    d = distance_block(u, v)
    return -jax.lax.top_k(-d, min(k1, d.shape[1]))[0]  # (rows, k1) ascending


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, block: int = PR_BLOCK) -> np.ndarray:
    """(N,) float32: each point's squared distance to its k-th nearest neighbour (itself is the 0th)."""
    x = np.asarray(features, np.float32)
    n = len(x)
    if n < k + 1:
        raise ValueError(f"a k={k} manifold needs at least {k + 1} points, got {n}")
    radii = np.zeros(n, np.float32)
    for r0 in range(0, n, block):
        rows = jnp.asarray(x[r0:r0 + block])
        best = None
        for c0 in range(0, n, block):
            cand = _block_smallest(rows, jnp.asarray(x[c0:c0 + block]), k + 1)
            best = cand if best is None else -jax.lax.top_k(-jnp.concatenate([best, cand], 1), k + 1)[0]
        radii[r0:r0 + block] = np.asarray(best[:, k])
    return radii


@jax.jit
def _inside(ref, ref_radii, samples, sample_radii):
    d = distance_block(ref, samples)  # (n_ref, n_samples)
    ref_in = jnp.any(d <= sample_radii[None, :], axis=1)  # ref point inside the samples' manifold
    sample_in = jnp.any(d <= ref_radii[:, None], axis=0)  # sample inside the reference manifold
    return ref_in, sample_in


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS,
                     block: int = PR_BLOCK) -> Tuple[float, float]:
    """ADM's improved precision (samples inside the reference manifold) and recall (the reverse)."""
    ref, samples = np.asarray(ref, np.float32), np.asarray(samples, np.float32)
    ref_radii, sample_radii = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
    ref_in = np.zeros(len(ref), bool)
    sample_in = np.zeros(len(samples), bool)
    for r0 in range(0, len(ref), block):
        for s0 in range(0, len(samples), block):
            a, b = _inside(jnp.asarray(ref[r0:r0 + block]), jnp.asarray(ref_radii[r0:r0 + block]),
                           jnp.asarray(samples[s0:s0 + block]), jnp.asarray(sample_radii[s0:s0 + block]))
            ref_in[r0:r0 + block] |= np.asarray(a)
            sample_in[s0:s0 + block] |= np.asarray(b)
    return float(sample_in.mean()), float(ref_in.mean())
