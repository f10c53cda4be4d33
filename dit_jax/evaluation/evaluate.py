"""The library entry point of `dit-jax-eval`: ADM's five numbers for a reference batch and a sample batch.

    from dit_jax.evaluation.evaluate import evaluate, compute_stats, format_results
    params = convert.inception_weights.inception_params(args.inception)   # command lines resolve the weights
    results = evaluate("VIRTUAL_imagenet256_labeled.npz", "samples.npz", params)
    print(format_results(results))      # ADM's lines: "Inception Score: X", "FID: X", "sFID: X", ...
    save_stats("ref_stats.npz", compute_stats("images/", params))

REF and SAMPLES are ADM .npz files (arr_0 and/or mu, sigma, mu_s, sigma_s), folders of images, or
`Batch` objects. As in ADM, statistics stored in a file are used for FID/sFID instead of recomputing them,
and arr_0 is still read for precision/recall (and for the Inception Score of SAMPLES). A metric whose inputs
are missing (a side with statistics only) is None, reported as "not available". Every input is checked
before the network runs: too few images for a metric is an EvalInputError that names the minimum.
`inception` may be a loader (a function of no arguments returning the params), called only when some
batch needs features: two statistics-only files give FID and sFID without the network or its weights.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Union

import jax.numpy as jnp
import numpy as np

from dit_jax.evaluation import metrics as M
from dit_jax.evaluation.batches import Batch, EvalInputError, Stats, open_batch
from dit_jax.evaluation.features import FeatureExtractor
from dit_jax.evaluation.weights import load_params

METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
LABELS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
          "recall": "Recall"}


Inception = Union[str, Dict[str, Any], Callable[[], Dict[str, Any]], None]


def _params(inception: Inception) -> Dict[str, Any]:
    """A converted .npz path, a params tree, or a loader of either (called here, when features are needed)."""
    if callable(inception):
        inception = inception()
    return load_params(inception) if isinstance(inception, str) else inception


def _batch(x: Union[str, Batch]) -> Batch:
    return x if isinstance(x, Batch) else open_batch(x)


def stats_of(features: Dict[str, np.ndarray]) -> Stats:
    mu, sigma = M.statistics(features["pool"])
    mu_s, sigma_s = M.statistics(features["spatial"])
    return Stats(mu, sigma, mu_s, sigma_s)


def _check_counts(ref: Batch, samples: Batch, wanted) -> None:
    """Fail before any compute when a batch is too small for a metric it would be used for."""
    for metric in wanted:
        need = M.MIN_IMAGES[metric]
        sides = {"inception_score": [samples], "fid": [ref, samples], "sfid": [ref, samples],
                 "precision": [ref, samples], "recall": [ref, samples]}[metric]
        for side in sides:
            if metric in ("fid", "sfid") and side.stats is not None:
                continue  # stored statistics
            if side.images is not None and side.num_images < need:
                raise EvalInputError(f"{side.name}: {side.num_images} image(s); {LABELS[metric]} needs at least "
                                     f"{need} images per batch")


def _no_images(batch: Batch, side: str) -> str:
    what = "statistics but no arr_0 images" if batch.stats is not None else "neither arr_0 images nor statistics"
    return f"{side} {batch.name} has {what}"


def unavailable_reasons(ref: Batch, samples: Batch) -> Dict[str, str]:
    """{metric: why it cannot be computed from these batches} for the metrics that cannot."""
    out = {}
    if samples.images is None:
        out["inception_score"] = f"needs the sample images; {_no_images(samples, 'SAMPLES')}"
    for side, b in (("REF", ref), ("SAMPLES", samples)):
        if b.images is None:
            if b.stats is None:
                out.setdefault("fid", _no_images(b, side))
                out.setdefault("sfid", _no_images(b, side))
            out.setdefault("precision", f"needs images on both sides; {_no_images(b, side)}")
            out.setdefault("recall", out["precision"])
    return out


def evaluate(ref: Union[str, Batch], samples: Union[str, Batch], inception: Inception, *,
             per_device_batch: int = 32, dtype: Any = jnp.float32, progress: bool = True,
             log: Callable[[str], None] = lambda s: None, extractor: Any = None) -> Dict[str, Any]:
    """{"inception_score", "fid", "sfid", "precision", "recall"} (None where not available), plus
    "num_ref_images", "num_sample_images" and "not_available" ({metric: reason}).
    `inception`: the params tree, a converted .npz path, or a loader of either, used only when features are
    needed. `extractor`: an existing FeatureExtractor (or anything with its `extract`) to use instead."""
    ref, samples = _batch(ref), _batch(samples)
    reasons = unavailable_reasons(ref, samples)
    possible = {m: m not in reasons for m in METRICS}
    _check_counts(ref, samples, [m for m in METRICS if possible[m]])
    need_ref = ref.images is not None and (possible["precision"] or ref.stats is None)
    need_samples = samples.images is not None
    if extractor is None and (need_ref or need_samples):
        extractor = FeatureExtractor(_params(inception), per_device_batch=per_device_batch, dtype=dtype)
    ref_feats = samples_feats = None
    if need_ref:
        log(f"computing reference batch activations ({ref.num_images} images of {ref.name})")
        ref_feats = extractor.extract(ref.images, progress=progress, desc="reference")
    if need_samples:
        log(f"computing sample batch activations ({samples.num_images} images of {samples.name})")
        samples_feats = extractor.extract(samples.images, progress=progress, desc="samples")
    out: Dict[str, Any] = {m: None for m in METRICS}
    if possible["inception_score"]:
        out["inception_score"] = M.inception_score(samples_feats["logits_unbiased"])
    if possible["fid"]:
        log("computing statistics and Fréchet distances")
        rs = ref.stats if ref.stats is not None else stats_of(ref_feats)
        ss = samples.stats if samples.stats is not None else stats_of(samples_feats)
        out["fid"] = M.frechet_distance(ss.mu, ss.sigma, rs.mu, rs.sigma)
        out["sfid"] = M.frechet_distance(ss.mu_s, ss.sigma_s, rs.mu_s, rs.sigma_s)
    if possible["precision"]:
        log("computing precision and recall")
        out["precision"], out["recall"] = M.precision_recall(ref_feats["pool"], samples_feats["pool"])
    out["num_ref_images"], out["num_sample_images"] = ref.num_images, samples.num_images
    out["not_available"] = reasons
    return out


def compute_stats(source: Union[str, Batch], inception: Inception, *,
                  per_device_batch: int = 32, dtype: Any = jnp.float32, progress: bool = True,
                  extractor: Any = None) -> Stats:
    """FID statistics (float64 mu, sigma, mu_s, sigma_s) of a batch's images (what --save-stats writes)."""
    batch = _batch(source)
    if batch.images is None:
        raise EvalInputError(f"{batch.name}: no images (arr_0) to compute statistics from")
    if batch.num_images < M.MIN_IMAGES["fid"]:
        raise EvalInputError(f"{batch.name}: {batch.num_images} image(s); statistics need at least "
                             f"{M.MIN_IMAGES['fid']} images")
    if extractor is None:
        extractor = FeatureExtractor(_params(inception), per_device_batch=per_device_batch, dtype=dtype)
    return stats_of(extractor.extract(batch.images, progress=progress, desc="statistics"))


def format_results(results: Dict[str, Any]) -> str:
    """ADM's report lines, in ADM's order; a metric without inputs reads "not available (reason)"."""
    reasons = results.get("not_available", {})

    def value(m: str) -> str:
        if results.get(m) is not None:
            return str(results[m])
        return "not available" + (f" ({reasons[m]})" if m in reasons else "")

    return "\n".join(f"{LABELS[m]}: {value(m)}" for m in METRICS)
