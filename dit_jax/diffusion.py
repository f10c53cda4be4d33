"""Gaussian diffusion for DiT in JAX: losses, posterior, DDPM and DDIM sampling loops.

The equations are those of Ho et al. (DDPM), Nichol & Dhariwal (learned-range variance, hybrid loss) and
Song et al. (DDIM), with the conventions of the DiT release (ADM code base) so that trained weights and
sampled images agree with it:

* `create_diffusion(...)` takes the release factory's arguments.
* `t` given to `training_losses`, `p_mean_variance`, ... is an index into the (possibly respaced) chain;
  the model function always receives the ORIGINAL timestep (`timestep_map[t]`).
* Arrays are NHWC; a model with learned sigma returns (N, H, W, 2C) and is split on the last axis.
* Schedule constants are float64 NumPy computed once, gathered per step and cast to float32.

Sampling loops are a `lax.scan` over the steps, so a caller's `jax.jit` compiles the whole loop once.
Random numbers for step `t` are `step_noise(rng, t, shape)`; `rng` may be one key or one key per example
(then every example's noise is independent of the batch it is in).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.utils.progress import tick as progress_tick
from dit_jax.diffusion_schedules import get_named_beta_schedule, parse_respacing, respace_betas

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (N,H,W,C), t (N,) original timesteps) -> (N,H,W,C')

MEAN_TYPES = ("epsilon", "x0")
VAR_TYPES = ("learned", "learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# ----------------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------------
def _is_key_batch(rng: jax.Array) -> bool:
    """True for a batch of keys (one per example): typed keys of shape (N,) or raw uint32 keys (N, 2)."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def step_noise(rng: jax.Array, t, shape) -> jax.Array:
    """Standard normal noise of `shape` for loop step `t` (float32).

    One key: normal(fold_in(rng, t), shape). A batch of N keys: example i gets
    normal(fold_in(rng[i], t), shape[1:]), so its noise does not depend on the other examples.
    """
    if _is_key_batch(rng):
        if rng.shape[0] != shape[0]:
            raise ValueError(f"got {rng.shape[0]} per-example keys for a batch of {shape[0]}")
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), tuple(shape[1:])))(rng)
    return jax.random.normal(jax.random.fold_in(rng, t), tuple(shape))


# ----------------------------------------------------------------------------------------------------
# Likelihood helpers (elementwise, float32)
# ----------------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    # The tanh approximation of the normal CDF that the ADM code uses; kept for equal numbers.
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), in nats."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over every axis but the batch axis: (N, ...) -> (N,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------
# The diffusion
# ----------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion chain of `len(betas)` steps.

    Args:
      betas: (K,) float64 betas of this chain.
      model_mean_type: "epsilon" (model predicts the noise) or "x0" (model predicts x_0).
      model_var_type: "learned_range" (DiT), "learned", "fixed_small" or "fixed_large".
      loss_type: "mse", "rescaled_mse", "kl" or "rescaled_kl".
      timestep_map: (K,) original timestep of each step, given to the model; identity if None.
      original_num_steps: length of the un-respaced chain (for reference only).
    """

    def __init__(self, betas, model_mean_type: str = "epsilon", model_var_type: str = "learned_range",
                 loss_type: str = "mse", timestep_map=None, original_num_steps: Optional[int] = None):
        for value, allowed, what in ((model_mean_type, MEAN_TYPES, "model_mean_type"),
                                     (model_var_type, VAR_TYPES, "model_var_type"),
                                     (loss_type, LOSS_TYPES, "loss_type")):
            if value not in allowed:
                raise ValueError(f"{what} {value!r} is not one of {allowed}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must be a 1-D array in (0, 1], got shape {betas.shape}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.original_num_steps = int(original_num_steps or self.num_timesteps)
        tm = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map, np.int64)
        if tm.shape != betas.shape:
            raise ValueError(f"timestep_map has shape {tm.shape}, expected {betas.shape}")
        self.timestep_map = tm

        # Everything below is float64 NumPy, computed once.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0, so its log there is replaced by the value at t=1.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # Fixed-large variance: betas, with the posterior variance at t=0 (a better decoder likelihood).
        if self.num_timesteps > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        else:
            self.fixed_large_variance = betas.copy()
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _extract(arr: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
        """arr[t] as float32, shaped (N, 1, ..., 1) to broadcast against `like` (N, ...)."""
        vals = jnp.take(jnp.asarray(arr, dtype=jnp.float32), jnp.asarray(t, jnp.int32))
        return vals.reshape(vals.shape + (1,) * (like.ndim - vals.ndim))

    def _call_model(self, model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
        """Runs the model with the ORIGINAL timesteps of the respaced steps `t`."""
        t_orig = jnp.take(jnp.asarray(self.timestep_map, jnp.int32), jnp.asarray(t, jnp.int32))
        out = model_fn(x, t_orig)
        want = x.shape[:-1] + (x.shape[-1] * (2 if self.model_var_type.startswith("learned") else 1),)
        if tuple(out.shape) != tuple(want):
            raise ValueError(f"model_fn returned shape {tuple(out.shape)}; expected {want} (NHWC, channels last"
                             f"{', mean and variance halves' if self.model_var_type.startswith('learned') else ''})")
        return out

    # -- forward process ----------------------------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._extract(np.log(1.0 - self.alphas_cumprod), t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # -- reverse process ----------------------------------------------------------------------------
    def _mean_variance_from_output(self, model_output, x, t, clip_denoised: bool = False,
                                   denoised_fn: Optional[Callable] = None) -> Dict[str, jax.Array]:
        c = x.shape[-1]
        if self.model_var_type in ("learned", "learned_range"):
            model_output, var_values = model_output[..., :c], model_output[..., c:]
            if self.model_var_type == "learned":
                log_variance = var_values
            else:
                # var_values in [-1, 1] interpolates log variance between the posterior's and beta's.
                min_log = self._extract(self.posterior_log_variance_clipped, t, x)
                max_log = self._extract(self.log_betas, t, x)
                frac = (var_values + 1.0) / 2.0
                log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = jnp.exp(log_variance)
        elif self.model_var_type == "fixed_large":
            variance = self._extract(self.fixed_large_variance, t, x) * jnp.ones_like(x)
            log_variance = self._extract(self.fixed_large_log_variance, t, x) * jnp.ones_like(x)
        else:  # fixed_small
            variance = self._extract(self.posterior_variance, t, x) * jnp.ones_like(x)
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x) * jnp.ones_like(x)

        def process(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

        if self.model_mean_type == "x0":
            pred_xstart = process(model_output)
        else:
            pred_xstart = process(self._predict_xstart_from_eps(x, t, model_output))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model_fn: ModelFn, x, t, clip_denoised: bool = False,
                        denoised_fn: Optional[Callable] = None) -> Dict[str, jax.Array]:
        """p(x_{t-1} | x_t): {"mean", "variance", "log_variance", "pred_xstart"}, each (N, H, W, C).

        x: (N, H, W, C); t: (N,) int indices into this (respaced) chain.
        """
        out = self._call_model(model_fn, x, t)
        return self._mean_variance_from_output(out, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model_fn: ModelFn, x, t, noise, clip_denoised: bool = False,
                 denoised_fn: Optional[Callable] = None) -> Dict[str, jax.Array]:
        """One ancestral step x_t -> x_{t-1} with the given noise (no noise is added at t == 0)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
        nonzero = (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x, t, noise=None, eta: float = 0.0, clip_denoised: bool = False,
                    denoised_fn: Optional[Callable] = None) -> Dict[str, jax.Array]:
        """One DDIM step x_t -> x_{t-1}; `noise` is only used when eta != 0."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
        # Re-derive eps from the (possibly clipped) x_0 so the step is consistent with it.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
        sample = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1.0 - abar_prev - sigma**2) * eps
        if noise is not None:
            nonzero = (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- loops --------------------------------------------------------------------------------------
    def _initial_noise(self, shape, rng, noise):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return jnp.asarray(noise, jnp.float32)
        if rng is None:
            raise ValueError("pass either noise=x_T or rng to draw it")
        # Step indices 0..K-1 are used for the per-step noise; K labels the starting noise.
        return step_noise(rng, self.num_timesteps, shape)

    def _loop(self, step_fn, x_T, progress: bool, desc: str):
        n = self.num_timesteps
        tick = functools.partial(progress_tick, total=n, desc=desc)

        def body(x, i):  # i runs K-1, ..., 0
            x = step_fn(x, i)
            if progress:  # a host callback only when a bar was asked for
                jax.debug.callback(tick, n - i)
            return x, None

        x, _ = jax.lax.scan(body, x_T, jnp.arange(n - 1, -1, -1, dtype=jnp.int32))
        return x

    def p_sample_loop(self, model_fn: ModelFn, shape, rng=None, noise=None, clip_denoised: bool = False,
                      denoised_fn: Optional[Callable] = None, progress: bool = False) -> jax.Array:
        """Ancestral (DDPM) sampling from x_T = noise (or drawn from rng) down to x_0; returns (N, H, W, C).

        The noise of step t is `step_noise(rng, t, shape)`; rng may hold one key per example.
        """
        x_T = self._initial_noise(shape, rng, noise)
        if rng is None:
            raise ValueError("p_sample_loop needs rng for the per-step noise")

        def step(x, i):
            t = jnp.full((shape[0],), i, jnp.int32)
            return self.p_sample(model_fn, x, t, step_noise(rng, i, shape), clip_denoised, denoised_fn)["sample"]

        return self._loop(step, x_T, progress, "DDPM")

    def ddim_sample_loop(self, model_fn: ModelFn, shape, rng=None, noise=None, eta: float = 0.0,
                         clip_denoised: bool = False, denoised_fn: Optional[Callable] = None,
                         progress: bool = False) -> jax.Array:
        """DDIM sampling from x_T down to x_0; deterministic for eta == 0 (then rng is not needed)."""
        x_T = self._initial_noise(shape, rng, noise)
        stochastic = not (isinstance(eta, (int, float)) and eta == 0.0)
        if stochastic and rng is None:
            raise ValueError(f"ddim_sample_loop with eta={eta} needs rng for the per-step noise")

        def step(x, i):
            t = jnp.full((shape[0],), i, jnp.int32)
            z = step_noise(rng, i, shape) if stochastic else None
            return self.ddim_sample(model_fn, x, t, z, eta, clip_denoised, denoised_fn)["sample"]

        return self._loop(step, x_T, progress, "DDIM")

    # -- training -----------------------------------------------------------------------------------
    def _vb_terms_bpd(self, model_output, x_start, x_t, t) -> jax.Array:
        """Per-example variational bound term in bits per dim: KL(q || p) for t > 0, decoder NLL at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return jnp.where(jnp.asarray(t) == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise=None, rng=None) -> Dict[str, jax.Array]:
        """Per-example losses {"loss", "mse", "vb"}, each (N,) float32, with loss = mse + vb.

        MSE losses: "mse" is the mean squared error of the predicted eps (or x_0); with learned variance,
        "vb" is the variational bound term computed on a stop-gradient mean (it trains only the variance),
        scaled by K/1000 for "rescaled_mse"; with fixed variance "vb" is 0.
        KL losses: "vb" is the whole bound term (times K for "rescaled_kl") and "mse" is 0.
        x_start: (N, H, W, C); t: (N,) int indices into this chain; noise: (N, H, W, C) or drawn from rng.
        """
        if noise is None:
            if rng is None:
                raise ValueError("training_losses needs noise or rng")
            noise = jax.random.normal(rng, x_start.shape, jnp.float32)
        x_t = self.q_sample(x_start, t, noise)
        zeros = jnp.zeros((x_start.shape[0],), jnp.float32)
        model_output = self._call_model(model_fn, x_t, t)
        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self._vb_terms_bpd(model_output, x_start, x_t, t)
            if self.loss_type == "rescaled_kl":
                vb = vb * self.num_timesteps
            return {"loss": vb, "mse": zeros, "vb": vb}

        c = x_start.shape[-1]
        if self.model_var_type in ("learned", "learned_range"):
            pred, var_values = model_output[..., :c], model_output[..., c:]
            frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
            vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                # Keeps the bound's weight independent of the chain length (the release divides by 1000).
                vb = vb * (self.num_timesteps / 1000.0)
        else:
            pred, vb = model_output, zeros
        target = noise if self.model_mean_type == "epsilon" else x_start
        mse = mean_flat(jnp.square(target - pred))
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(timestep_respacing, noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False, learn_sigma: bool = True,
                     rescale_learned_sigmas: bool = False, diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The DiT release factory: create_diffusion("") to train, create_diffusion("250") or ("ddim50") to sample.

    use_kl selects the rescaled KL loss, rescale_learned_sigmas the rescaled MSE (as in the release); other
    loss types ("kl") are available through GaussianDiffusion(loss_type=...).
    """
    base_betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    betas, timestep_map = respace_betas(base_betas, parse_respacing(timestep_respacing, diffusion_steps))
    return GaussianDiffusion(betas, model_mean_type="x0" if predict_xstart else "epsilon",
                             model_var_type=var_type, loss_type=loss_type, timestep_map=timestep_map,
                             original_num_steps=diffusion_steps)
