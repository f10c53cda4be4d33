"""An independent float64 NumPy statement of the diffusion equations, for the parity tests.

Written plainly from the papers (DDPM, improved DDPM, DDIM) and the facts of the DiT release; it does not
import dit_jax. Arrays are NHWC; `t` is an index into the (respaced) chain and the model is called with
the original timestep `timestep_map[t]`.
"""
import math

import numpy as np


# -- schedules --------------------------------------------------------------------------------------
def ref_betas(name, steps):
    if name == "linear":
        s = 1000.0 / steps
        return np.linspace(s * 0.0001, s * 0.02, steps)
    if name == "squaredcos_cap_v2":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    raise ValueError(name)


def ref_kept_timesteps(steps, spec):
    """Sorted list of the original timesteps that a respacing string keeps.

    A re-statement of the DiT release's loop (diffusion/respace.py), not of dit_jax's code: "ddimN" is the
    first integer stride from 1 up that yields exactly N steps; otherwise each section walks a float cursor
    from 0, adding (size - 1) / (count - 1) after every kept step and keeping round(cursor) (Python's
    half-to-even). The running sum matters: it rounds differently from j * stride for 278 counts of 1000.
    """
    if spec in (None, ""):
        return list(range(steps))
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, steps):
            if len(range(0, steps, stride)) == n:
                return list(range(0, steps, stride))
        raise ValueError(spec)
    counts = [int(c) for c in spec.split(",")]
    base, longer = divmod(steps, len(counts))
    kept, offset = set(), 0
    for section, count in enumerate(counts):
        size = base + 1 if section < longer else base
        if count > size:
            raise ValueError(spec)
        increment = (size - 1) / (count - 1) if count > 1 else 1
        cursor = 0.0
        for _ in range(count):
            kept.add(offset + round(cursor))
            cursor = cursor + increment
        offset += size
    return sorted(kept)


class RefDiffusion:
    def __init__(self, schedule="linear", spec="", mean="epsilon", var="learned_range", loss="mse", steps=1000):
        full = ref_betas(schedule, steps)
        abar_full = np.cumprod(1 - full)
        self.timestep_map = ref_kept_timesteps(steps, spec)
        # The sub-chain keeps alpha_bar at the kept steps: beta_k = 1 - abar(k) / abar(previous kept).
        betas, prev = [], 1.0
        for k in self.timestep_map:
            betas.append(1 - abar_full[k] / prev)
            prev = abar_full[k]
        self.betas = np.array(betas)
        self.T = len(betas)
        self.mean, self.var, self.loss = mean, var, loss
        self.abar = np.cumprod(1 - self.betas)
        self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])

    # per-step scalars, float64
    def post_var(self, t):
        return self.betas[t] * (1 - self.abar_prev[t]) / (1 - self.abar[t])

    def post_logvar_clipped(self, t):
        return math.log(self.post_var(1) if t == 0 else self.post_var(t))

    def q_sample(self, x0, t, noise):
        return np.stack([math.sqrt(self.abar[ti]) * x0[i] + math.sqrt(1 - self.abar[ti]) * noise[i]
                         for i, ti in enumerate(t)])

    def posterior(self, x0, xt, t):
        """mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0), per example."""
        means, vs, lvs = [], [], []
        for i, ti in enumerate(t):
            c1 = self.betas[ti] * math.sqrt(self.abar_prev[ti]) / (1 - self.abar[ti])
            c2 = (1 - self.abar_prev[ti]) * math.sqrt(1 - self.betas[ti]) / (1 - self.abar[ti])
            means.append(c1 * x0[i] + c2 * xt[i])
            vs.append(np.full_like(x0[i], self.post_var(ti)))
            lvs.append(np.full_like(x0[i], self.post_logvar_clipped(ti)))
        return np.stack(means), np.stack(vs), np.stack(lvs)

    def model(self, model_fn, x, t):
        return model_fn(x, np.array([self.timestep_map[ti] for ti in t]))

    def from_output(self, out, x, t, clip=False):
        c = x.shape[-1]
        res = {k: [] for k in ("mean", "variance", "log_variance", "pred_xstart")}
        for i, ti in enumerate(t):
            o = out[i]
            var = None
            if self.var == "learned_range":
                pred, v = o[..., :c], o[..., c:]
                lo, hi = self.post_logvar_clipped(ti), math.log(self.betas[ti])
                logvar = (v + 1) / 2 * hi + (1 - (v + 1) / 2) * lo
            elif self.var == "fixed_large":
                pred = o
                logvar = np.full_like(pred, math.log(self.post_var(1) if ti == 0 else self.betas[ti]))
            else:
                # fixed_small: the variance itself is 0 at t == 0; only its log is clipped.
                pred = o
                logvar = np.full_like(pred, self.post_logvar_clipped(ti))
                var = np.full_like(pred, self.post_var(ti))
            if self.mean == "x0":
                x0 = pred
            else:
                x0 = x[i] / math.sqrt(self.abar[ti]) - math.sqrt(1 / self.abar[ti] - 1) * pred
            if clip:
                x0 = np.clip(x0, -1, 1)
            m, _, _ = self.posterior(x0[None], x[i][None], [ti])
            res["mean"].append(m[0])
            res["variance"].append(np.exp(logvar) if var is None else var)
            res["log_variance"].append(logvar)
            res["pred_xstart"].append(x0)
        return {k: np.stack(v) for k, v in res.items()}

    def p_mean_variance(self, model_fn, x, t, clip=False):
        return self.from_output(self.model(model_fn, x, t), x, t, clip)

    # -- losses --
    @staticmethod
    def _cdf(x):
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def decoder_nll_bits(self, x0, mean, logvar):
        inv = np.exp(-0.5 * logvar)
        up = self._cdf(inv * (x0 - mean + 1 / 255))
        lo = self._cdf(inv * (x0 - mean - 1 / 255))
        logp = np.where(x0 < -0.999, np.log(np.maximum(up, 1e-12)),
                        np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(up - lo, 1e-12))))
        return -logp.reshape(len(x0), -1).mean(1) / math.log(2)

    def vb_bits(self, out, x0, xt, t):
        tm, _, tlv = self.posterior(x0, xt, t)
        p = self.from_output(out, xt, t)
        kl = 0.5 * (-1 + p["log_variance"] - tlv + np.exp(tlv - p["log_variance"])
                    + (tm - p["mean"]) ** 2 * np.exp(-p["log_variance"]))
        kl = kl.reshape(len(x0), -1).mean(1) / math.log(2)
        nll = self.decoder_nll_bits(x0, p["mean"], p["log_variance"])
        return np.where(np.asarray(t) == 0, nll, kl)

    def training_losses(self, model_fn, x0, t, noise):
        xt = self.q_sample(x0, t, noise)
        out = self.model(model_fn, xt, t)
        n = len(x0)
        if self.loss in ("kl", "rescaled_kl"):
            vb = self.vb_bits(out, x0, xt, t) * (self.T if self.loss == "rescaled_kl" else 1)
            return {"loss": vb, "mse": np.zeros(n), "vb": vb}
        c = x0.shape[-1]
        pred = out[..., :c]
        vb = np.zeros(n)
        if self.var == "learned_range":
            vb = self.vb_bits(out, x0, xt, t)  # forward values equal the stop-gradient version
            if self.loss == "rescaled_mse":
                vb = vb * self.T / 1000
        target = noise if self.mean == "epsilon" else x0
        mse = ((target - pred) ** 2).reshape(n, -1).mean(1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- loops --
    def ddpm_loop(self, model_fn, x_T, noises):
        """noises[k]: the (N, H, W, C) noise of chain step k."""
        x = x_T
        for k in reversed(range(self.T)):
            t = [k] * len(x)
            p = self.p_mean_variance(model_fn, x, t)
            x = p["mean"] + (0.0 if k == 0 else 1.0) * np.exp(0.5 * p["log_variance"]) * noises[k]
        return x

    def ddim_loop(self, model_fn, x_T, eta=0.0, noises=None, clip=False):
        x = x_T
        for k in reversed(range(self.T)):
            t = [k] * len(x)
            p = self.p_mean_variance(model_fn, x, t, clip)
            a, ap = self.abar[k], self.abar_prev[k]
            eps = (x / math.sqrt(a) - p["pred_xstart"]) / math.sqrt(1 / a - 1)
            sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
            x = p["pred_xstart"] * math.sqrt(ap) + math.sqrt(1 - ap - sigma ** 2) * eps
            if k > 0 and eta != 0:
                x = x + sigma * noises[k]
        return x
