"""The public conversion calls. torch is imported only when torch tensors are asked for."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from convert import diffusers_keys, io
from convert.mapping import (ConversionError, infer_config, params_to_state_dict, state_dict_to_params,
                             strip_wrapper_prefixes)
from dit_jax.model import DiT
from dit_jax.pretrained import is_pretrained_dir, load_pretrained


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16/fp16 go through float32 (NumPy has no bfloat16)
        t = value.detach().cpu()
        if not t.is_floating_point():
            return t.numpy()
        return t.float().numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"value of key {key!r} is not an array ({type(value).__name__})") from e
    if arr.dtype == object:
        raise ConversionError(f"value of key {key!r} is not an array ({type(value).__name__})")
    return arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr


def select_state_dict(obj: Mapping[str, Any], use_model: bool = False) -> Mapping[str, Any]:
    """A release state_dict as is; from a train.py checkpoint the "ema" weights (or "model" if asked)."""
    if not isinstance(obj, Mapping) and callable(getattr(obj, "state_dict", None)):
        obj = obj.state_dict()  # a whole pickled nn.Module (only readable with allow_pickle)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a state_dict or a checkpoint dict, got {type(obj).__name__}")
    if "model" in obj or "ema" in obj:
        want = "model" if use_model else "ema"
        if want not in obj:
            raise ConversionError(f"checkpoint has keys {sorted(obj)} but no {want!r} entry"
                                  + ("" if use_model else " (use --use-model / use_model=True for 'model')"))
        return obj[want]
    return obj


def torch_to_flax(obj: Mapping[str, Any], use_model: bool = False, num_heads: Optional[int] = None,
                  input_size: Optional[int] = None, num_classes: Optional[int] = None,
                  diffusers_config: Optional[Mapping[str, Any]] = None,
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A PyTorch DiT state_dict (release layout or diffusers layout) or train.py checkpoint dict ->
    (Flax params as NumPy float32, DiT keyword arguments inferred from the shapes).

    `diffusers_config` (a diffusers config.json as a dict) supplies input_size, heads and norm_eps for a
    diffusers state_dict; explicit arguments win over it."""
    state = select_state_dict(obj, use_model)
    if not isinstance(state, Mapping):
        raise ConversionError(f"expected the weights to be a state_dict (a mapping of names to tensors), "
                              f"got {type(state).__name__}")
    state = {k: _to_numpy(v, k) for k, v in strip_wrapper_prefixes(state).items()}
    extra: Dict[str, Any] = {}
    if diffusers_keys.is_diffusers_state_dict(state):
        state, extra = diffusers_keys.diffusers_to_release(state, diffusers_config)
        input_size = input_size if input_size is not None else extra.pop("input_size", None)
        num_heads = num_heads if num_heads is not None else extra.pop("num_heads", None)
        extra.pop("input_size", None)
        extra.pop("num_heads", None)
    cfg = infer_config(state, num_heads=num_heads, input_size=input_size, num_classes=num_classes)
    cfg.update(extra)
    return state_dict_to_params(state, cfg), cfg


def flax_to_torch(params: Mapping[str, Any], cfg: Optional[Mapping[str, Any]] = None, as_numpy: bool = False
                  ) -> Dict[str, Any]:
    """Flax params -> release-layout state_dict (torch float32 tensors, or NumPy with as_numpy=True) that
    loads into the PyTorch DiT with strict=True. `cfg` (the DiT keyword arguments, e.g. from torch_to_flax
    or a converted model's config.json) is required: it sizes pos_embed, which Flax params do not determine;
    without it a ConversionError says so."""
    if "params" in params and len(params) == 1:
        params = params["params"]
    state = params_to_state_dict(params, cfg)
    if as_numpy:
        return state
    import torch  # optional stack (the `torch` extra): only torch outputs need it

    def tensor(v: np.ndarray):
        v = np.ascontiguousarray(v)
        return torch.from_numpy(v if v.flags.writeable else v.copy())  # arrays from JAX are read-only

    return {k: tensor(v) for k, v in state.items()}


def load_torch_checkpoint(path: str, use_model: bool = False, num_heads: Optional[int] = None,
                          input_size: Optional[int] = None, num_classes: Optional[int] = None,
                          allow_pickle: bool = False, log=lambda s: None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A checkpoint on disk (.pt/.pth/.bin, .safetensors, diffusers folder) -> (Flax params, DiT kwargs)."""
    ckpt = io.read_checkpoint(path, allow_pickle=allow_pickle, log=log)
    try:
        n = len(select_state_dict(ckpt.obj, use_model))
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    log(f"converting {n} tensors")
    try:
        params, cfg = torch_to_flax(ckpt.obj, use_model=use_model, num_heads=num_heads, input_size=input_size,
                                    num_classes=num_classes, diffusers_config=ckpt.diffusers_config)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    # Our .safetensors writer records the config; keep the two diffusers-only settings it may carry.
    if "dit_jax_config" in ckpt.metadata:
        saved = json.loads(ckpt.metadata["dit_jax_config"])
        for key in ("timestep_freq_shift", "mlp_norm_eps"):
            if key in saved and key not in cfg:
                cfg[key] = saved[key]
    return params, cfg


def load_any(path: str, dtype: Any = None, use_model: bool = False, num_heads: Optional[int] = None,
             input_size: Optional[int] = None, num_classes: Optional[int] = None, allow_pickle: bool = False,
             log: Callable[[str], None] = lambda s: None, **model_kwargs) -> Tuple[DiT, Dict[str, Any]]:
    """(DiT module, params) from a dit_jax directory or any PyTorch format (converted on the fly):
    release .pt, train.py checkpoint (EMA unless use_model), .safetensors, diffusers folder."""
    path = os.fspath(path)
    if is_pretrained_dir(path):
        return load_pretrained(path, dtype=dtype, **model_kwargs)
    params, cfg = load_torch_checkpoint(path, use_model=use_model, num_heads=num_heads, input_size=input_size,
                                        num_classes=num_classes, allow_pickle=allow_pickle, log=log)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    return DiT(**cfg, **model_kwargs), params
