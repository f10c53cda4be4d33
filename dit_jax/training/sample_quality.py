"""Sample quality measured during training (config.eval): the EMA model sampled across the mesh and scored.

kind "inception": `num_samples` images (balanced classes, DDIM `respacing`, guidance `cfg_scale`) decoded by
  the VAE, Inception features on every device, then FID and sFID against `reference_stats` (an .npz of mu,
  sigma, mu_s, sigma_s written by `dit-jax-eval --save-stats`) and the Inception Score. Logged as
  eval/fid, eval/sfid, eval/inception_score.
kind "digits": the embedded data's stand-in (dit_jax.evaluation.digits): a Fréchet distance on the features
  of a small network trained on the real digits and the conditional class accuracy, logged as
  eval/digits_fd and eval/digits_class_acc (not ImageNet FID).
The samples' noise comes from config.eval.seed, so successive evaluations differ only by the weights.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from dit_jax.evaluation import digits as digits_eval
from dit_jax.evaluation import metrics
from dit_jax.evaluation.batches import load_stats
from dit_jax.evaluation.evaluate import stats_of
from dit_jax.evaluation.features import FeatureExtractor
from dit_jax.evaluation.weights import PTH_NAME, converted_cache_path, load_params
from dit_jax.model import DiT
from dit_jax.training.samples import VaeLoader, make_sampler
from dit_jax.utils import paths
from dit_jax.utils.errors import ConfigError
from dit_jax.utils.images import to_uint8
from dit_jax.vae import decode_latents

log = logging.getLogger("dit_jax.train")
KINDS = ("inception", "digits")
InceptionLoader = Callable[[Any], Dict[str, Any]]  # config.eval.inception (a path or None) -> Inception params


def check_eval_config(config) -> None:
    """Before any compute: the kind exists and its inputs are there."""
    e = config.eval
    if not e.every_steps:
        return
    if e.kind not in KINDS:
        raise ConfigError(f"config.eval.kind={e.kind!r}; expected one of {KINDS}")
    if e.num_samples < 2:
        raise ConfigError(f"config.eval.num_samples={e.num_samples}: the Fréchet distance needs at least 2 samples")
    if e.batch_size < 1:
        raise ConfigError(f"config.eval.batch_size={e.batch_size}: must be >= 1")
    if e.kind == "digits" and config.data.name != "digits":
        raise ConfigError(f"config.eval.kind='digits' scores digits samples; config.data.name={config.data.name!r} "
                          f"(use kind 'inception' with config.eval.reference_stats)")
    if e.kind == "inception":
        if not e.reference_stats or not paths.is_file(e.reference_stats):
            raise ConfigError(f"config.eval.reference_stats={e.reference_stats!r}: no such file; write one with "
                              f"`dit-jax-eval --tfds imagenet2012 --split train --save-stats PATH` (or set "
                              f"config.eval.every_steps=0)")


def load_converted_inception(path) -> Dict[str, Any]:
    """The core's Inception loader: a converted .npz (default: the cached one). pytorch-fid's .pth needs torch
    to convert; `dit-jax-train` passes a loader that converts (and downloads) it once."""
    path = path or converted_cache_path()
    if not paths.is_file(path) or not str(path).endswith(".npz"):
        raise ConfigError(f"config.eval.inception={path!r}: expected a converted Inception .npz; convert pytorch-fid's "
                          f"{PTH_NAME} once with `python -m convert.inception_weights` (dit-jax-train does it itself)")
    return load_params(path)


class Evaluator:
    """evaluate(ema_params) -> {"eval/...": value}; everything that can be built once is built here."""

    def __init__(self, config, model: DiT, mesh: Mesh, load_vae: VaeLoader, load_inception: InceptionLoader):
        e = config.eval
        self.config, self.kind, self.n, self.batch = config, e.kind, int(e.num_samples), int(e.batch_size)
        self.sample = make_sampler(config, model, mesh, respacing=e.respacing, cfg_scale=float(e.cfg_scale))
        self.labels = (np.arange(self.n) % model.num_classes).astype(np.int32)  # balanced classes
        shape = (self.n, model.input_size, model.input_size, model.in_channels)
        self.noise = np.random.default_rng(int(e.seed)).standard_normal(shape).astype(np.float32)
        if self.kind == "digits":
            self.scorer = digits_eval.scorer()
            log.info("eval: digits network held-out accuracy %.3f (the real digits score digits_fd 0)",
                     self.scorer.heldout_accuracy)
        else:
            self.reference = load_stats(e.reference_stats)
            self.extractor = FeatureExtractor(load_inception(e.inception), per_device_batch=self.batch)
            self.vae = load_vae(config.data.vae)

    def samples(self, ema_params, between: Optional[Callable[[], None]] = None) -> np.ndarray:
        """x_0 of all num_samples, in batches of eval.batch_size (the last one padded to the same shape);
        `between()` runs before each batch and may raise to stop."""
        out = []
        for start in range(0, self.n, self.batch):
            if between is not None:
                between()
            idx = np.arange(start, start + self.batch) % self.n
            out.append(self.sample(ema_params, self.labels[idx], self.noise[idx])[: self.n - start])
        return np.concatenate(out)

    def __call__(self, ema_params, between: Optional[Callable[[], None]] = None) -> Dict[str, float]:
        """Scores of `ema_params`. `between()` runs between batches (sampling, decoding) and may raise to
        stop the evaluation there (the train loop's preemption.Watcher.raise_if_stopping)."""
        t0 = time.time()
        between = between or (lambda: None)
        x0 = self.samples(ema_params, between)  # (N, S, S, C)
        between()
        if self.kind == "digits":
            out = {f"eval/{k}": v for k, v in self.scorer.score(x0, self.labels).items()}
        else:
            vae, vae_params = self.vae
            images = []
            for z in np.array_split(x0, max(1, len(x0) // self.batch)):
                images.append(np.asarray(to_uint8(decode_latents(vae, vae_params, jax.numpy.asarray(z)))))
                between()
            images = np.concatenate(images)
            feats = self.extractor.extract(images, progress=False, desc="eval")
            st = stats_of(feats)
            ref = self.reference
            out = {"eval/fid": metrics.frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma),
                   "eval/sfid": metrics.frechet_distance(st.mu_s, st.sigma_s, ref.mu_s, ref.sigma_s),
                   "eval/inception_score": metrics.inception_score(feats["logits_unbiased"])}
        out["eval/seconds"] = time.time() - t0
        return out
