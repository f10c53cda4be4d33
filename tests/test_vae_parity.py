"""Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (the independent reference), and loading.

Parity metric: rel_err = max|a - b| / max|b| (conftest); tolerance 1e-4 in float32.
"""
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers
import torch

from conftest import nchw, nhwc, rel_err
from convert.vae_weights import load_vae
from dit_jax import vae as vae_module
from dit_jax.utils.safetensors_io import WeightsFileError
from dit_jax.vae import LATENT_SCALE, AutoencoderKL, decode_latents, encode_to_latents
from dit_jax.vae_weights import flax_path, infer_config, read_state_dict
from dit_jax.vae_weights import state_dict_to_params as torch_to_flax_vae

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread_references")  # PyTorch on one thread: less CPU (conftest)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=256)  # sd-vae-ft-mse / -ema
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32)


def make_torch_vae(cfg, seed=0):
    """A diffusers AutoencoderKL with every norm scale/shift and bias randomised (nothing trivially 0 or 1)."""
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def torch_reference(m, images, latents):
    with torch.no_grad():
        dist = m.encode(torch.from_numpy(nchw(images))).latent_dist
        dec = m.decode(torch.from_numpy(nchw(latents))).sample
    return nhwc(dist.mean), nhwc(dist.logvar), nhwc(dec)


@functools.partial(jax.jit, static_argnums=0)  # compiled once per (configuration, shape)
def _encode(vae, params, images):
    return vae.apply({"params": params}, images, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vae, params, latents):
    return vae.apply({"params": params}, latents, method=AutoencoderKL.decode)


def flax_outputs(vae, params, images, latents):
    mean, logvar = _encode(vae, params, images)
    return np.asarray(mean), np.asarray(logvar), np.asarray(_decode(vae, params, latents))


def inputs(batch, size, rng):
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    latents = rng.normal(size=(batch, size // 8, size // 8, 4)).astype(np.float32)
    return images, latents


@pytest.fixture(scope="module")
def sd_pair():
    """The real sd-vae configuration (83.7M params) on random weights, in both frameworks."""
    m = make_torch_vae(SD_VAE)
    cfg = infer_config({k: v.numpy() for k, v in m.state_dict().items()})
    return m, AutoencoderKL(**cfg), torch_to_flax_vae(m.state_dict(), cfg)


@pytest.mark.slow
def test_sd_vae_parity_encode_decode(sd_pair):
    m, vae, params = sd_pair
    assert sum(p.numel() for p in m.parameters()) == sum(x.size for x in jax.tree_util.tree_leaves(params))
    images, latents = inputs(2, 32, np.random.default_rng(0))
    ref_mean, ref_logvar, ref_dec = torch_reference(m, images, latents)
    mean, logvar, dec = flax_outputs(vae, params, images, latents)
    assert mean.shape == logvar.shape == (2, 4, 4, 4) and dec.shape == (2, 32, 32, 3)
    errs = {"mean": rel_err(mean, ref_mean), "logvar": rel_err(logvar, ref_logvar), "decode": rel_err(dec, ref_dec)}
    print("sd-vae parity rel_err:", errs)
    assert all(e <= TOL for e in errs.values()), errs
    assert np.std(ref_mean) > 1e-2 and np.std(ref_dec) > 1e-2  # non-trivial outputs
    # The check can fail: a spatially flipped conv kernel (a plausible converter bug) is far outside TOL.
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["decoder"]["conv_out"]["kernel"] = params["decoder"]["conv_out"]["kernel"][::-1, ::-1]
    assert rel_err(flax_outputs(vae, bad, images, latents)[2], ref_dec) > 100 * TOL


@pytest.fixture(scope="module")
def tiny_pair():
    m = make_torch_vae(TINY, seed=5)
    cfg = infer_config({k: v.numpy() for k, v in m.state_dict().items()})
    return m, cfg


def test_latent_helpers(tiny_pair):
    m, cfg = tiny_pair
    vae, params = AutoencoderKL(**cfg), torch_to_flax_vae(m.state_dict(), cfg)
    images, latents = inputs(1, 16, np.random.default_rng(2))  # same shapes as the other tiny tests: one compile
    mean, logvar = _encode(vae, params, images)
    np.testing.assert_allclose(encode_to_latents(vae, params, images, None), mean * LATENT_SCALE, rtol=1e-5,
                               atol=1e-6)
    rng = jax.random.PRNGKey(3)
    eps = jax.random.normal(rng, mean.shape)
    np.testing.assert_allclose(encode_to_latents(vae, params, images, rng),
                               (mean + jnp.exp(0.5 * logvar) * eps) * LATENT_SCALE, rtol=1e-5, atol=1e-6)
    direct = _decode(vae, params, latents / LATENT_SCALE)
    np.testing.assert_allclose(decode_latents(vae, params, latents), direct, rtol=1e-5, atol=1e-5)


def test_group_norm_eps_is_visible(tiny_pair, monkeypatch):
    """Low-amplitude images and latents: the first GroupNorms see a small variance, so their eps shows.

    With ordinary inputs a GroupNorm eps of 1e-5 instead of 1e-6 moves the encoder outputs by ~5e-5, inside TOL.
    """
    m, cfg = tiny_pair
    vae, params = AutoencoderKL(**cfg), torch_to_flax_vae(m.state_dict(), cfg)
    images, latents = inputs(1, 16, np.random.default_rng(2))
    images, latents = 0.03 * images, 0.03 * latents
    ref = torch_reference(m, images, latents)

    def errors(outputs):
        return {k: rel_err(a, b) for k, a, b in zip(("mean", "logvar", "decode"), outputs, ref)}

    good = errors(flax_outputs(vae, params, images, latents))  # the shared programs (the default eps)
    monkeypatch.setattr(vae_module, "GROUP_NORM_EPS", 1e-5)
    # fresh jits: GROUP_NORM_EPS is read when tracing
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))(params, images)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(params, latents)
    wrong = errors([np.asarray(a) for a in (mean, logvar, dec)])
    print("low-amplitude VAE parity rel_err:", good, "with GroupNorm eps 1e-5:", wrong)
    assert all(e <= TOL for e in good.values()), good
    assert all(e > 10 * TOL for e in wrong.values()), f"a wrong GroupNorm eps is not visible: {wrong}"


def test_bfloat16_compute_close_to_float32(tiny_pair):
    m, cfg = tiny_pair
    params = torch_to_flax_vae(m.state_dict(), cfg)
    images, latents = inputs(1, 16, np.random.default_rng(4))
    f32 = flax_outputs(AutoencoderKL(**cfg), params, images, latents)
    bf16 = flax_outputs(AutoencoderKL(**cfg, dtype=jnp.bfloat16), params, images, latents)
    for a, b in zip(bf16, f32):
        assert a.dtype == np.float32 and rel_err(a, b) < 5e-2, rel_err(a, b)


def _check_loaded(m, vae, params):
    images, latents = inputs(1, 16, np.random.default_rng(6))
    for got, ref in zip(flax_outputs(vae, params, images, latents), torch_reference(m, images, latents)):
        assert rel_err(got, ref) <= TOL


def test_load_saved_diffusers_folder_safetensors_and_bin(tiny_pair, tmp_path):
    m, cfg = tiny_pair
    m.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors
    vae, params = load_vae(str(tmp_path / "vae"))
    assert vae.block_out_channels == (32, 64) and vae.layers_per_block == 1
    _check_loaded(m, vae, params)
    # A pipeline folder holding vae/ works too.
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, load_vae(str(tmp_path))[1], params))
    # A bare .safetensors (no config.json next to it): configuration read off the shapes.
    (tmp_path / "bare").mkdir()
    bare = tmp_path / "bare" / "weights.safetensors"
    shutil.copy(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", bare)
    vae2, params2 = load_vae(str(bare))
    assert vae2 == vae
    _check_loaded(m, vae2, params2)
    # A .bin state_dict read with torch.load(weights_only=True).
    binf = tmp_path / "bare" / "diffusion_pytorch_model.bin"
    torch.save(m.state_dict(), binf)
    _check_loaded(m, *load_vae(str(binf)))
    # A bfloat16 safetensors file (numpy cannot hold bf16: read through torch), upcast to float32.
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, str(tmp_path / "bare" / "bf16.safetensors"))
    _, p16 = load_vae(str(tmp_path / "bare" / "bf16.safetensors"))
    for a, b in zip(jax.tree_util.tree_leaves(p16), jax.tree_util.tree_leaves(params)):
        assert a.dtype == np.float32 and rel_err(a, b) < 1e-2
    # bfloat16 compute through load_vae.
    assert load_vae(str(tmp_path / "vae"), dtype=jnp.bfloat16)[0].dtype == jnp.bfloat16


def test_old_attention_names(tiny_pair, tmp_path):
    from safetensors.torch import save_file

    m, cfg = tiny_pair
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in m.state_dict().items():
        for new_name, old_name in old.items():
            k = k.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        state[k] = v.contiguous()
    assert any(".query.weight" in k for k in state) and any(".proj_attn.bias" in k for k in state)
    # Some old files stored the attention projections as 1x1 convs.
    state["encoder.mid_block.attentions.0.query.weight"] = state["encoder.mid_block.attentions.0.query.weight"][
        :, :, None, None].contiguous()
    save_file(state, str(tmp_path / "old.safetensors"))
    _check_loaded(m, *load_vae(str(tmp_path / "old.safetensors")))


def test_bad_keys_and_shapes_name_the_key(tiny_pair, tmp_path):
    m, cfg = tiny_pair
    state = {k: v.numpy() for k, v in m.state_dict().items()}

    extra = dict(state, **{"encoder.bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsFileError, match=r"encoder\.bogus\.weight"):
        torch_to_flax_vae(extra, cfg)

    missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.1.resnets.0.conv2.bias"}
    with pytest.raises(WeightsFileError, match=r"decoder\.up_blocks_1\.resnets_0\.conv2\.bias"):
        torch_to_flax_vae(missing, cfg)

    wrong = dict(state)
    wrong["decoder.conv_in.weight"] = np.zeros((64, 4, 3, 1), np.float32)
    with pytest.raises(WeightsFileError, match=r"decoder\.conv_in\.weight: shape \(3, 1, 4, 64\)"):
        torch_to_flax_vae(wrong, cfg)

    with pytest.raises(WeightsFileError, match="does not match|not filled"):
        torch_to_flax_vae(state, dict(cfg, block_out_channels=(32, 64, 64)))

    m.save_pretrained(tmp_path / "vae")
    cfg_file = tmp_path / "vae" / "config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(raw, latent_channels=8)))
    with pytest.raises(WeightsFileError, match="latent_channels=8"):
        load_vae(str(tmp_path / "vae"))
    with pytest.raises(WeightsFileError, match="does not exist"):
        load_vae(str(tmp_path / "nowhere"))


def test_key_rule():
    assert flax_path("encoder.down_blocks.0.resnets.1.conv1.weight") == (
        "encoder", "down_blocks_0", "resnets_1", "conv1", "weight")
    assert flax_path("decoder.mid_block.attentions.0.proj_attn.bias") == (
        "decoder", "mid_block", "attentions_0", "to_out_0", "bias")


def test_read_state_dict_rejects_unknown_format(tmp_path):
    p = tmp_path / "w.npz"
    p.write_bytes(b"x")
    with pytest.raises(WeightsFileError, match="unknown VAE weights format"):
        read_state_dict(str(p))
