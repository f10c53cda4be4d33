"""VAE weights in PyTorch pickles (`diffusion_pytorch_model.bin`, a torch.save state_dict): read with torch,
mapped by dit_jax.vae_weights. Everything else (.safetensors, the Hub's "mse"/"ema") goes straight to the
core loader, so `load_vae` here accepts every format the command lines take.

    vae, params = load_vae("path/to/vae_folder_or_file")      # .bin, .safetensors, a diffusers folder, mse, ema
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

from convert.io import load_torch_file
from convert.mapping import ConversionError
from dit_jax import vae_weights as core
from dit_jax.vae import AutoencoderKL


def read_torch_state_dict(path: str) -> Dict[str, Any]:
    """A torch.save state_dict file -> {key: float32 NumPy array} (torch.load with weights_only=True)."""
    state = load_torch_file(path)
    if not hasattr(state, "items"):
        raise ConversionError(f"{path}: expected a state_dict (a mapping of key -> tensor), got {type(state)}")
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def load_vae(source: str = "mse", dtype: Any = jnp.float32, cache_dir: Optional[str] = None
             ) -> Tuple[AutoencoderKL, Dict[str, Any]]:
    """dit_jax.vae_weights.load_vae, plus pickled .bin weights."""
    if source in ("mse", "ema"):
        return core.load_vae(source, dtype=dtype, cache_dir=cache_dir)
    weights, cfg_path = core.find_vae_files(source)
    if not core.is_pickle_file(weights):
        return core.load_vae(source, dtype=dtype, cache_dir=cache_dir)
    state = read_torch_state_dict(weights)
    cfg = core.config_for(state, cfg_path, weights)
    return AutoencoderKL(**cfg, dtype=dtype), core.state_dict_to_params(state, cfg)
