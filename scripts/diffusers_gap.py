"""How far diffusers' DiTTransformer2DModel is from the release DiT on the same weights (docs/convert.md).

diffusers computes the timestep sinusoid with exponents divided by (half - 1) instead of half, and its MLP
LayerNorm with norm_eps (1e-5 by default) instead of 1e-6. Weights move between the formats bit for bit, so a
model exported to the other format computes a slightly different function. This measures how different:

    PYTHONPATH=. python scripts/diffusers_gap.py                        # random weights, depth 2: S/2, B/4
    PYTHONPATH=. python scripts/diffusers_gap.py --release-pt E.pt --num-heads 6      # trained, release maths
    PYTHONPATH=. python scripts/diffusers_gap.py --diffusers-pt E.pt --num-heads 6    # trained, diffusers maths

Trained weights for the last two: `dit-jax-train --config digits --workdir W --config.num_steps=2000
--export-torch E.pt` (release maths), and for diffusers' maths the same run with the model built with
timestep_freq_shift=1, mlp_norm_eps=1e-5 (no config field selects them):

    PYTHONPATH=. python scripts/diffusers_gap.py --train-diffusers-maths W E.pt     # ~7 CPU minutes Metric: rel = max|a - b| / max|b| over a batch, per timestep, on
the whole output and on the noise prediction (the first C channels); for trained digits also DDIM-50
samples from the same noise (pixels in [-1, 1]) and the digit a classifier reads in them.
Needs torch and diffusers (the `torch` extra) and scikit-learn for the digits.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DiTTransformer2DModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")  # conftest would otherwise make a cache folder for a test run
from conftest import perturbed_torch_dit, rel_err  # noqa: E402  (the tests' random weights: the same numbers)

import convert  # noqa: E402
from convert import load_any, writers  # noqa: E402
from convert.reference.torch_dit import DiT as TorchDiT  # noqa: E402
from dit_jax.diffusion import create_diffusion  # noqa: E402
from dit_jax.model import DiT  # noqa: E402

TIMESTEPS = (0, 100, 250, 500, 750, 999)
TORCH_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "class_dropout_prob", "num_classes", "learn_sigma")


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def diffusers_fn(m):
    def f(x, t, y):
        with torch.no_grad():
            return m(hidden_states=nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    return f


def release_fn(state, cfg):
    tm = TorchDiT(**{k: cfg[k] for k in TORCH_KEYS}).eval()
    tm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)

    def f(x, t, y):
        with torch.no_grad():
            return tm(nchw(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    return f


def jax_fn(model, params):
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    return lambda x, t, y: np.asarray(apply(params, x, t, y)).transpose(0, 3, 1, 2)


def export_to_diffusers(state, cfg, folder):
    """The release-layout state through our writer (what `dit-jax-convert to-torch --format diffusers` does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writers.write(state, cfg, folder, "diffusers")
    return DiTTransformer2DModel.from_pretrained(folder).eval()


def compare(label, a_fn, b_fn, x, y, channels):
    """rel(a, b) per timestep: whole output / noise-prediction channels."""
    cols = []
    for t in TIMESTEPS:
        tt = np.full(len(x), t, np.int64)
        a, b = a_fn(x, tt, y), b_fn(x, tt, y)
        cols.append(f"t={t}: {rel_err(a, b):.2e}/{rel_err(a[:, :channels], b[:, :channels]):.2e}")
    print(f"{label}: " + "  ".join(cols), flush=True)


def random_weights(name):
    tm = perturbed_torch_dit(name, depth=2, input_size=32, num_classes=1000)
    params, cfg = convert.torch_to_flax(tm.state_dict())
    state = convert.flax_to_torch(params, cfg, as_numpy=True)
    r = np.random.default_rng(0)
    x = r.standard_normal((4, 32, 32, 4)).astype(np.float32)  # (N, H, W, C)
    y = r.integers(0, 1000, 4).astype(np.int64)
    with tempfile.TemporaryDirectory() as d:
        m = export_to_diffusers(state, cfg, os.path.join(d, "diffusers"))
        back, back_params = load_any(os.path.join(d, "diffusers"))
        compare(f"{name} depth 2 random: diffusers(export) vs release", diffusers_fn(m), release_fn(state, cfg), x, y, 4)
        compare(f"{name} depth 2 random: dit_jax(export read back) vs diffusers", jax_fn(back, back_params),
                diffusers_fn(m), x, y, 4)
        # The other direction: the same weights as a diffusers model (norm_eps 1e-5) written as a release .pt.
        m5 = export_to_diffusers(state, {**cfg, "mlp_norm_eps": 1e-5}, os.path.join(d, "diffusers_eps5"))
        compare(f"{name} depth 2 random: release(export) vs diffusers (norm_eps 1e-5)", release_fn(state, cfg),
                diffusers_fn(m5), x, y, 4)


def noised_digits(n=100, seed=0):
    """x_t of real digits (N, 8, 8, 1) in the training scale, labels; q(x_t | x_0) is applied per timestep."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))[:n]
    return (d.images[idx] / 8.0 - 1.0)[..., None].astype(np.float32), d.target[idx].astype(np.int64)


def compare_noised(label, a_fn, b_fn, x0, y):
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    eps = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
    cols = []
    for t in TIMESTEPS:
        xt = (np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * eps).astype(np.float32)
        tt = np.full(len(x0), t, np.int64)
        a, b = a_fn(xt, tt, y), b_fn(xt, tt, y)
        cols.append(f"t={t}: {rel_err(a, b):.2e}/{rel_err(a[:, :1], b[:, :1]):.2e}")
    print(f"{label}: " + "  ".join(cols), flush=True)


def ddim_samples(model, params, labels, noise):
    d = create_diffusion("ddim50")
    y = jnp.asarray(labels)

    def model_fn(x, t):
        return model.apply({"params": params}, x, t, y)

    return np.asarray(jax.jit(lambda n: d.ddim_sample_loop(model_fn, n.shape, noise=n, eta=0.0,
                                                           clip_denoised=True))(jnp.asarray(noise)))


def trained(path, num_heads, trained_maths):
    """trained_maths: "release" or "diffusers" (what the weights learned on); the other maths is the export's."""
    from dit_jax.evaluation.digits import scorer, to_digit_pixels

    params, cfg = convert.torch_to_flax(torch.load(path, weights_only=True), num_heads=num_heads)
    state = convert.flax_to_torch(params, cfg, as_numpy=True)
    x0, y = noised_digits()
    # What diffusers computes: shift 1 always; the MLP eps is the config's (our writer keeps the model's).
    diffusers_side = {**cfg, "timestep_freq_shift": 1.0, **({"mlp_norm_eps": 1e-5} if trained_maths == "diffusers" else {})}
    own, other = (cfg, diffusers_side) if trained_maths == "release" else (diffusers_side, cfg)
    with tempfile.TemporaryDirectory() as d:
        m = export_to_diffusers(state, diffusers_side, os.path.join(d, "diffusers"))
        diff, rel = diffusers_fn(m), release_fn(state, cfg)
        if trained_maths == "release":
            compare_noised("trained (release maths): diffusers(export) vs release", diff, rel, x0, y)
        else:
            compare_noised("trained (diffusers maths): release(export) vs diffusers", rel, diff, x0, y)
        compare_noised("  dit_jax with diffusers' maths vs diffusers", jax_fn(DiT(**diffusers_side), params),
                       diff, x0, y)
    labels = np.repeat(np.arange(10), 10)
    noise = np.random.default_rng(2).standard_normal((100, 8, 8, 1)).astype(np.float32)
    a = ddim_samples(DiT(**own), params, labels, noise)  # the maths the weights were trained with
    b = ddim_samples(DiT(**other), params, labels, noise)  # the exported model's
    s = scorer()
    pa, pb = s.net.predict(to_digit_pixels(a) / 16.0), s.net.predict(to_digit_pixels(b) / 16.0)
    print(f"  DDIM-50 samples, same noise, 100 digits: max|d pixel| {np.abs(a - b).max():.3f}, mean "
          f"{np.abs(a - b).mean():.4f} (pixels in [-1, 1]); class accuracy own maths {np.mean(pa == labels):.2f}, "
          f"export's maths {np.mean(pb == labels):.2f}; same digit read in {np.mean(pa == pb):.2f}; "
          f"digits_fd {s.score(a, labels)['digits_fd']:.2f} vs {s.score(b, labels)['digits_fd']:.2f}", flush=True)


def train_with_diffusers_maths(workdir, out_pt, steps=2000):
    """The digits run of `dit-jax-train --config digits` with the model computing as diffusers does."""
    from configs import digits
    from dit_jax import train
    from dit_jax.training import build
    from dit_jax.cli.train import export_torch

    plain = build.build_model
    build.build_model = lambda config: plain(config).clone(timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
    c = digits.get_config()
    c.num_steps, c.eval.every_steps, c.sample.every_steps = steps, 0, 0
    export_torch(out_pt, train.train_and_evaluate(c, workdir))
    build.build_model = plain


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release-pt", help="trained weights (release maths), a release-layout .pt")
    p.add_argument("--diffusers-pt", help="trained weights (diffusers maths), a release-layout .pt")
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--train-diffusers-maths", nargs=2, metavar=("WORKDIR", "OUT_PT"),
                   help="train the digits DiT with diffusers' maths and export its EMA weights, then stop")
    args = p.parse_args()
    if args.train_diffusers_maths:
        return train_with_diffusers_maths(*args.train_diffusers_maths)
    print("rel = max|a - b| / max|b|; each entry: whole output / noise-prediction channels")
    if not (args.release_pt or args.diffusers_pt):
        for name in ("DiT-S/2", "DiT-B/4"):
            random_weights(name)
    if args.release_pt:
        trained(args.release_pt, args.num_heads, "release")
    if args.diffusers_pt:
        trained(args.diffusers_pt, args.num_heads, "diffusers")


if __name__ == "__main__":
    main()
