"""Round trips torch -> flax -> torch: bit-exact values, identical keys in the release's order.

In memory, and through every file format: .pt, train.py-style dict, .safetensors, diffusers folder, orbax dir.
Exactness: torch.equal on every tensor (no tolerance).
"""
import argparse

import numpy as np
import pytest
import torch

import convert
from convert import io, writers
from convert.api import load_torch_checkpoint
from convert.reference.torch_dit import DiT, DiT_models
from convert import load_any
from dit_jax.pretrained import load_pretrained, save_pretrained


def random_release_state(name="DiT-S/2", seed=0, **kw):
    torch.manual_seed(seed)
    m = DiT_models[name](depth=2, input_size=16, num_classes=10, **kw)
    with torch.no_grad():
        for key, p in m.named_parameters():
            if key != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    return m.state_dict(), m


def assert_identical(a, b):
    assert list(a) == list(b), "keys or key order differ"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("name,kw", [("DiT-S/2", {}), ("DiT-B/8", {"learn_sigma": False}),
                                     ("DiT-S/4", {"class_dropout_prob": 0.0})])
def test_in_memory_round_trip_is_exact(name, kw):
    state, _ = random_release_state(name, **kw)
    params, cfg = convert.torch_to_flax(state, num_classes=10)
    back = convert.flax_to_torch(params, cfg)
    assert_identical(back, state)
    DiT(**{k: v for k, v in cfg.items()}).load_state_dict(back, strict=True)


def test_round_trip_through_jax_arrays_and_wrapped_keys():
    import jax

    state, _ = random_release_state()
    wrapped = {"module." + k: v for k, v in state.items()}  # DistributedDataParallel prefix
    params, cfg = convert.torch_to_flax({"model": wrapped, "ema": wrapped, "opt": {}, "args": {}})
    params = jax.device_put(params)
    assert_identical(convert.flax_to_torch(params, cfg), state)


@pytest.mark.filterwarnings("ignore:diffusers' DiTTransformer2DModel divides")  # expected, tested elsewhere
@pytest.mark.parametrize("fmt,name", [("pt", "w.pt"), ("safetensors", "w.safetensors"), ("diffusers", "w_diff"),
                                      ("train", "ckpt.pt")])
def test_round_trip_through_files(tmp_path, fmt, name):
    state, _ = random_release_state()
    params, cfg = convert.torch_to_flax(state)
    out = str(tmp_path / name)
    assert writers.write(convert.flax_to_torch(params, cfg, as_numpy=True), cfg, out, fmt) == fmt
    params2, cfg2 = load_torch_checkpoint(out)
    for k in cfg:
        assert cfg2[k] == cfg[k], k
    if fmt == "diffusers":  # the diffusers config adds diffusers' timestep/eps conventions
        assert cfg2["timestep_freq_shift"] == 1.0 and cfg2["mlp_norm_eps"] == 1e-6
    assert_identical(convert.flax_to_torch(params2, cfg2), state)
    if fmt == "pt":  # the release layout loads with strict=True and is a plain state_dict
        loaded = torch.load(out, weights_only=True)
        assert_identical(loaded, state)
        DiT(**cfg).load_state_dict(loaded, strict=True)
    if fmt == "train":
        ckpt = torch.load(out, weights_only=True)
        assert set(ckpt) == {"model", "ema", "args"} and ckpt["args"]["image_size"] == 128
        assert ckpt["args"]["model"] is None  # depth 2 is not one of the 12 registry sizes


def test_train_checkpoint_ema_by_default(tmp_path):
    ema, _ = random_release_state(seed=0)
    raw, _ = random_release_state(seed=1)
    path = tmp_path / "0001000.pt"
    # Like the release train.py: an argparse.Namespace under "args" and an optimizer state.
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="DiT-S/2", image_size=128)}, path)
    p_ema, cfg = load_torch_checkpoint(str(path))
    p_raw, _ = load_torch_checkpoint(str(path), use_model=True)
    assert_identical(convert.flax_to_torch(p_ema, cfg), ema)
    assert_identical(convert.flax_to_torch(p_raw, cfg), raw)


def test_round_trip_through_orbax_dir(tmp_path):
    state, _ = random_release_state()
    params, cfg = convert.torch_to_flax(state)
    save_pretrained(params, cfg, tmp_path / "flax")
    model, params2 = load_pretrained(tmp_path / "flax")
    assert model.depth == 2 and model.input_size == 16 and model.num_classes == 10
    assert_identical(convert.flax_to_torch(params2, cfg), state)
    model3, params3 = load_any(str(tmp_path / "flax"))
    assert_identical(convert.flax_to_torch(params3, cfg), state)


def test_safetensors_bf16_is_read(tmp_path):
    from safetensors.torch import save_file

    state, _ = random_release_state()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    ckpt = io.read_checkpoint(str(tmp_path / "bf16.safetensors"))
    k = "blocks.0.attn.qkv.weight"
    assert ckpt.obj[k].dtype == np.float32
    np.testing.assert_array_equal(ckpt.obj[k], state[k].to(torch.bfloat16).float().numpy())


def test_safetensors_keeps_diffusers_settings(tmp_path):
    """Weights read from diffusers keep timestep_freq_shift / mlp_norm_eps through our .safetensors file."""
    state, _ = random_release_state()
    params, cfg = convert.torch_to_flax(state)
    cfg = {**cfg, "timestep_freq_shift": 1.0, "mlp_norm_eps": 1e-5}
    with pytest.warns(UserWarning, match="come from diffusers"):
        writers.write(convert.flax_to_torch(params, cfg, as_numpy=True), cfg, str(tmp_path / "w.safetensors"))
    _, cfg2 = load_torch_checkpoint(str(tmp_path / "w.safetensors"))
    assert cfg2["timestep_freq_shift"] == 1.0 and cfg2["mlp_norm_eps"] == 1e-5
