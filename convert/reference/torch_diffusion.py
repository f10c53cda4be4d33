"""The PyTorch side of DiT's Gaussian diffusion, as far as the benchmarks and end-to-end checks need it.

Learned-range sigma, epsilon prediction, the MSE + VB training loss, and the DDIM and DDPM sampling loops,
with schedule constants computed once in float64 NumPy (like dit_jax.diffusion). NCHW tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# One home for respacing: dit_jax's rule is tested against the release's loop for every step count
# (tests/test_diffusion.py), so the PyTorch side keeps exactly the same timesteps.
from dit_jax.diffusion_schedules import parse_respacing


class TorchDiffusion:
    def __init__(self, respacing: str = "", diffusion_steps: int = 1000):
        scale = 1000 / diffusion_steps
        base_betas = np.linspace(scale * 1e-4, scale * 0.02, diffusion_steps, dtype=np.float64)
        base_ac = np.cumprod(1.0 - base_betas)
        self.timestep_map = parse_respacing(respacing, diffusion_steps)
        prev, betas = 1.0, []
        for t in self.timestep_map:
            betas.append(1 - base_ac[t] / prev)
            prev = base_ac[t]
        b = np.array(betas)
        ac = np.cumprod(1 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1 - ac_prev) / (1 - ac)
        c = {
            "betas": b, "ac": ac, "ac_prev": ac_prev,
            "sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1 - ac),
            "sqrt_recip_ac": np.sqrt(1 / ac), "sqrt_recipm1_ac": np.sqrt(1 / ac - 1),
            "post_log_var": np.log(np.append(post_var[1], post_var[1:])),
            "log_betas": np.log(b),
            "coef1": b * np.sqrt(ac_prev) / (1 - ac), "coef2": (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac),
        }
        self.num_timesteps = len(b)
        self.c = {k: torch.tensor(v, dtype=torch.float64) for k, v in c.items()}
        self.map_t = torch.tensor(self.timestep_map, dtype=torch.long)

    def _g(self, name, t, x):  # gather per-example constants -> (N, 1, 1, 1) in x's dtype
        return self.c[name].to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def p_mean_variance(self, model, x, t):
        out = model(x, self.map_t.to(x.device)[t])
        eps, var_values = out.chunk(2, dim=1)
        frac = (var_values + 1) / 2
        log_var = frac * self._g("log_betas", t, x) + (1 - frac) * self._g("post_log_var", t, x)
        x0 = self._g("sqrt_recip_ac", t, x) * x - self._g("sqrt_recipm1_ac", t, x) * eps
        mean = self._g("coef1", t, x) * x0 + self._g("coef2", t, x) * x
        return mean, log_var, x0, eps

    def training_losses(self, model, x0, t, noise):
        x_t = self._g("sqrt_ac", t, x0) * x0 + self._g("sqrt_1m_ac", t, x0) * noise
        out = model(x_t, self.map_t.to(x0.device)[t])
        eps, var_values = out.chunk(2, dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        mean, log_var, _, _ = self.p_mean_variance(lambda *_: frozen, x_t, t)
        true_mean = self._g("coef1", t, x0) * x0 + self._g("coef2", t, x0) * x_t
        true_log_var = self._g("post_log_var", t, x0)
        kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    @torch.no_grad()
    def ddim_sample_loop(self, model, noise, eta=0.0, generator=None):
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            _, _, x0, _ = self.p_mean_variance(model, x, t)
            eps = (self._g("sqrt_recip_ac", t, x) * x - x0) / self._g("sqrt_recipm1_ac", t, x)
            ab, ab_prev = self._g("ac", t, x), self._g("ac_prev", t, x)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            x = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
            if eta > 0 and i > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    @torch.no_grad()
    def p_sample_loop(self, model, noise, generator=None):
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            mean, log_var, _, _ = self.p_mean_variance(model, x, t)
            x = mean
            if i > 0:
                x = x + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=generator, device=x.device,
                                                                 dtype=x.dtype)
        return x


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data under a Gaussian discretised to 256 bins on [-1, 1]."""
    def cdf(v):  # tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
