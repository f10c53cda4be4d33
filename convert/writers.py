"""Writing release-layout state dicts: `.pt` (plain or train.py-style), `.safetensors`, diffusers folders.

Every writer is atomic (dit_jax.utils.atomic): on a local disk it writes to a temporary name beside OUT and
renames it into place, so an error (or Ctrl-C) never leaves a partial file or folder at OUT; OUT may be a
bucket URL (gs://...), where a file is uploaded as one object and a folder is marked incomplete until done.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
from safetensors.numpy import save_file

from convert.diffusers_keys import (GAP_TRAINED_FROM_DIFFUSERS, TimestepMathsWarning, measured_gap,
                                    release_to_diffusers)
from convert.mapping import ConversionError
from dit_jax.model import model_name as registry_name
from dit_jax.utils import paths
from dit_jax.utils.atomic import atomic_dir, atomic_path, check_target, write_text

FORMATS = ("pt", "train", "safetensors", "diffusers")


def guess_format(out: str) -> str:
    """Output format from OUT's suffix; a path without a suffix (a directory) means a diffusers folder."""
    lower = out.lower().rstrip("/\\")
    if lower.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return "pt"
    if lower.endswith(".safetensors"):
        return "safetensors"
    if paths.as_path(out).is_dir() or not os.path.splitext(lower)[1]:
        return "diffusers"
    raise ConversionError(f"cannot tell the output format from {out!r}: use a .pt/.pth/.bin or .safetensors "
                          f"suffix, a directory name for diffusers, or pass --format {'|'.join(FORMATS)}")


@contextlib.contextmanager
def atomic_file(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary path in OUT's directory; renamed onto OUT only if the block succeeds."""
    check_target(out, overwrite)
    with atomic_path(out) as tmp:
        yield tmp


def _torch_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    import torch  # optional stack (the `torch` extra): only torch outputs need it

    def tensor(v):
        if isinstance(v, torch.Tensor):
            return v
        v = np.ascontiguousarray(v)
        return torch.from_numpy(v if v.flags.writeable else v.copy())  # orbax/mmap arrays are read-only

    return {k: tensor(v) for k, v in state.items()}


def _numpy_state(state: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
            for k, v in state.items()}


def write_pt(state: Mapping[str, Any], out: str, overwrite: bool = False) -> None:
    """A plain state_dict, like the release files (loads into convert.reference.torch_dit.DiT with strict=True)."""
    import torch  # optional stack (the `torch` extra): only torch outputs need it

    with atomic_file(out, overwrite) as tmp:
        torch.save(_torch_state(state), tmp)


def model_name(cfg: Mapping[str, Any]) -> Optional[str]:
    """"DiT-XL/2" etc. when the config is one of the 12 registry sizes, else None."""
    return registry_name(cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"])


def train_args(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A train.py-like "args" entry (plain types, so weights_only=True can read it back)."""
    return {"model": model_name(cfg), "image_size": int(cfg["input_size"]) * 8, "num_classes": int(cfg["num_classes"])}


def write_train(state: Mapping[str, Any], out: str, cfg: Optional[Mapping[str, Any]] = None,
                model_state: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> None:
    """A train.py-style dict {"model", "ema"[, "args"]}; `state` is the EMA, `model_state` the raw weights
    (the EMA again when not given)."""
    import torch  # optional stack (the `torch` extra): only torch outputs need it

    ema = _torch_state(state)
    model = _torch_state(model_state) if model_state is not None else {k: v.clone() for k, v in ema.items()}
    ckpt: Dict[str, Any] = {"model": model, "ema": ema}
    if cfg is not None:
        ckpt["args"] = train_args(cfg)
    with atomic_file(out, overwrite) as tmp:
        torch.save(ckpt, tmp)


def write_safetensors(state: Mapping[str, Any], out: str, overwrite: bool = False,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    meta = {"format": "pt", **(metadata or {})}  # "pt": what transformers/diffusers loaders look for
    with atomic_file(out, overwrite) as tmp:
        save_file(_numpy_state(state), tmp, metadata=meta)


def write_diffusers(state: Mapping[str, Any], cfg: Mapping[str, Any], out: str, overwrite: bool = False) -> None:
    """A DiTTransformer2DModel folder: config.json + diffusion_pytorch_model.safetensors."""
    d_state, d_config = release_to_diffusers(_numpy_state(state), cfg)
    with atomic_dir(out, overwrite) as tmp:
        with atomic_path(tmp / "diffusion_pytorch_model.safetensors") as weights:
            save_file({k: np.ascontiguousarray(v) for k, v in d_state.items()}, weights, metadata={"format": "pt"})
        write_text(tmp / "config.json", json.dumps(d_config, indent=2))


def write(state: Mapping[str, Any], cfg: Mapping[str, Any], out: str, fmt: Optional[str] = None,
          overwrite: bool = False) -> str:
    """Dispatch on `fmt` (guessed from OUT when None). Returns the format written."""
    fmt = fmt or guess_format(out)
    if fmt != "diffusers" and (float(cfg.get("timestep_freq_shift", 0.0)) != 0.0
                               or float(cfg.get("mlp_norm_eps", 1e-6)) != 1e-6):
        warnings.warn("these weights come from diffusers (timestep_freq_shift="
                      f"{cfg.get('timestep_freq_shift')}, mlp_norm_eps={cfg.get('mlp_norm_eps')}), but the release "
                      f"DiT computes with 0 and 1e-6, so it computes a different function of this {fmt} file: "
                      f"{measured_gap(GAP_TRAINED_FROM_DIFFUSERS)}. --format diffusers keeps them exact"
                      + (" (dit_jax itself reads the two settings back from this file's metadata)"
                         if fmt == "safetensors" else ""),
                      TimestepMathsWarning, stacklevel=2)
    if fmt == "pt":
        write_pt(state, out, overwrite)
    elif fmt == "train":
        write_train(state, out, cfg, overwrite=overwrite)
    elif fmt == "safetensors":
        write_safetensors(state, out, overwrite, metadata={"dit_jax_config": json.dumps(dict(cfg))})
    elif fmt == "diffusers":
        write_diffusers(state, cfg, out, overwrite)
    else:
        raise ConversionError(f"unknown output format {fmt!r}; expected one of {FORMATS}")
    return fmt
