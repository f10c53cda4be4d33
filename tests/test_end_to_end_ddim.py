"""End to end: a random PyTorch DiT + VAE, converted to Flax; guided DDIM from the same x_T in both frameworks.

The PyTorch side is a plain DDIM loop written here (float64 NumPy schedule constants cast to float32 per
step, like the release), driving the release-layout torch DiT with the release's doubled CFG batch.
Tolerances: latents <= 1e-4 relative, decoded images <= 1e-4 relative.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import perturbed_torch_dit, rel_err

import convert
from dit_jax.diffusion import create_diffusion
from dit_jax.guidance import dit_model_fn
from dit_jax.model import DiT

STEPS = "ddim10"
CFG = 4.0
LABELS = [1, 7, 3]


def torch_ddim(model, x_T, labels, spec=STEPS, cfg_scale=CFG):
    """DDIM (eta = 0) in PyTorch, NCHW, with classifier-free guidance as in the release sample.py."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar_full = np.cumprod(1.0 - betas)
    stride = 1000 // int(spec[4:])
    kept = list(range(0, 1000, stride))
    abar = abar_full[kept]
    abar_prev = np.append(1.0, abar[:-1])
    n = x_T.shape[0]
    x = torch.cat([x_T, x_T])  # (2N, C, H, W): conditional half, unconditional half
    y = torch.tensor(labels + [model.y_embedder.num_classes] * n)
    with torch.no_grad():
        for k in reversed(range(len(kept))):
            t = torch.full((2 * n,), kept[k], dtype=torch.long)  # the model sees the original timestep
            eps = model.forward_with_cfg(x, t, y, cfg_scale)[:, :4]
            a = torch.tensor(abar[k], dtype=torch.float32)
            ap = torch.tensor(abar_prev[k], dtype=torch.float32)
            x0 = torch.sqrt(1.0 / a) * x - torch.sqrt(1.0 / a - 1) * eps
            eps = (torch.sqrt(1.0 / a) * x - x0) / torch.sqrt(1.0 / a - 1)
            x = x0 * torch.sqrt(ap) + torch.sqrt(1 - ap) * eps
    return x[:n]


@pytest.fixture(scope="module")
def pair():
    tm = perturbed_torch_dit("DiT-S/2", seed=11, depth=2, input_size=8, num_classes=10)
    with torch.no_grad():  # larger adaLN / output weights than the helper's, so guidance matters
        for name, p in tm.named_parameters():
            if "final_layer.linear" in name:
                p.mul_(10.0)
    params, cfg = convert.torch_to_flax(tm.state_dict())
    return tm, DiT(**cfg), params


@pytest.fixture(scope="module")
def latents(pair):
    tm, fm, params = pair
    x_T = np.random.default_rng(0).normal(size=(len(LABELS), 8, 8, 4)).astype(np.float32)
    want = torch_ddim(tm, torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), LABELS)
    want = want.numpy().transpose(0, 2, 3, 1)
    d = create_diffusion(STEPS)

    @jax.jit
    def run(p, y, z):
        return d.ddim_sample_loop(dit_model_fn(fm, p, y, CFG), z.shape, noise=z, eta=0.0)

    got = np.asarray(run(params, jnp.asarray(LABELS), jnp.asarray(x_T)))
    return got, want, x_T


def test_ddim_latents_match_pytorch(latents):
    got, want, x_T = latents
    err = rel_err(got, want)
    print(f"DDIM latents JAX vs PyTorch rel_err = {err:.2e}")
    assert err <= 1e-4
    assert rel_err(want, x_T) > 0.1  # the loop did change the latents


def test_guidance_is_not_a_no_op(pair, latents):
    tm, _, _ = pair
    got, _, x_T = latents
    plain = torch_ddim(tm, torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), LABELS, cfg_scale=1.0)
    assert rel_err(plain.numpy().transpose(0, 2, 3, 1), got) > 1e-2


def test_decoded_images_match_pytorch(latents):
    import diffusers

    from dit_jax.vae import LATENT_SCALE, AutoencoderKL
    from dit_jax.vae_weights import infer_config, state_dict_to_params

    torch.manual_seed(2)
    tv = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                 layers_per_block=1, latent_channels=4, norm_num_groups=32).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # nothing trivially 0 or 1
        for name, p in tv.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    cfg = infer_config({k: v.numpy() for k, v in tv.state_dict().items()})
    vae, vparams = AutoencoderKL(**cfg), state_dict_to_params(tv.state_dict(), cfg)

    got_lat, want_lat, _ = latents
    with torch.no_grad():
        want = tv.decode(torch.from_numpy(want_lat.transpose(0, 3, 1, 2).copy()) / LATENT_SCALE).sample
    want = want.numpy().transpose(0, 2, 3, 1)
    got = jax.jit(lambda p, z: vae.apply({"params": p}, z / LATENT_SCALE, method=AutoencoderKL.decode))(
        vparams, jnp.asarray(got_lat))
    err = rel_err(got, want)
    print(f"decoded images JAX vs PyTorch rel_err = {err:.2e}")
    assert got.shape == (len(LABELS), 16, 16, 3) and err <= 1e-4
    assert math.isfinite(float(np.abs(want).max()))
