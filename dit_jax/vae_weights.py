"""diffusers `AutoencoderKL` weights -> Flax params for dit_jax.vae.AutoencoderKL (NumPy only, no torch).

    params, cfg = load_diffusers_vae("path/to/sd-vae-ft-mse")     # folder, or one .safetensors file
    vae = AutoencoderKL(**cfg)

`.safetensors` files are read here; a pickled `.bin` needs torch and is read by `convert.vae_weights`, which
then calls `state_dict_to_params` below.

Keys follow the diffusers layout (`encoder.down_blocks.0.resnets.0.norm1.weight`); both attention naming
schemes are read: `to_q/to_k/to_v/to_out.0` and the older `query/key/value/proj_attn`. The Flax module
names mirror the keys, so the rule is: join each numeric index to the name before it (`down_blocks.0` ->
`down_blocks_0`) and transpose the leaf (conv OIHW -> HWIO, linear (out, in) -> (in, out)).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from dit_jax.utils import paths
from dit_jax.utils.download import vae_weights_path
from dit_jax.utils.safetensors_io import WeightsFileError, looks_like_safetensors, read_safetensors
from dit_jax.vae import AutoencoderKL

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Older diffusers/LDM attention names -> current ones (one line per family).
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# diffusers config.json fields we read -> AutoencoderKL keyword arguments.
CONFIG_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                 "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                 "scaling_factor")


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------
def is_pickle_file(path: paths.PathLike) -> bool:
    """A torch.save file (zip archive or legacy pickle), recognised by its first bytes or its suffix."""
    with paths.as_path(path).open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or (
        not looks_like_safetensors(path) and os.fspath(path).endswith((".bin", ".pt", ".pth", ".ckpt")))


def read_state_dict(path: paths.PathLike) -> Dict[str, np.ndarray]:
    """A .safetensors file -> {key: float32 NumPy array}; a pickled file names the reader that takes it."""
    if not paths.is_file(path):
        raise WeightsFileError(f"VAE weights file not found: {path}")
    if looks_like_safetensors(path):
        return read_safetensors(path)[0]
    if is_pickle_file(path):
        raise WeightsFileError(f"{path}: a PyTorch pickle; read it with convert.vae_weights.load_vae (the command "
                               f"lines' --vae PATH do), or save the weights as .safetensors")
    raise WeightsFileError(f"{path}: unknown VAE weights format (expected .safetensors or .bin)")


def find_vae_files(path: paths.PathLike) -> Tuple[str, Optional[str]]:
    """A folder (diffusers VAE folder, or a pipeline folder with `vae/`) or a weights file, local or on a
    bucket -> (weights file, config.json path or None)."""
    path = os.fspath(path)
    if paths.as_path(path).is_dir():
        sub = paths.join(path, "vae")
        folder = sub if paths.as_path(sub).is_dir() else path
        for name in WEIGHT_FILES:
            if paths.is_file(paths.join(folder, name)):
                cfg = paths.join(folder, "config.json")
                return paths.join(folder, name), cfg if paths.is_file(cfg) else None
        raise WeightsFileError(f"{folder}: no VAE weights found; expected one of {', '.join(WEIGHT_FILES)}")
    if paths.is_file(path):
        cfg = os.fspath(paths.as_path(path).parent / "config.json")
        return path, cfg if paths.is_file(cfg) else None
    raise WeightsFileError(f"VAE path does not exist: {path} (give a diffusers folder or a weights file)")


def config_from_diffusers(raw: Mapping[str, Any], source: str = "config.json") -> Dict[str, Any]:
    """diffusers AutoencoderKL config.json -> AutoencoderKL keyword arguments; rejects what we don't build."""
    act = raw.get("act_fn", "silu")
    if act != "silu":
        raise WeightsFileError(f"{source}: act_fn={act!r} is not supported (only 'silu')")
    for field, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in raw.get(field, []) if t != expected]
        if bad:
            raise WeightsFileError(f"{source}: {field} contains {bad}; only {expected!r} is supported")
    if raw.get("shift_factor") not in (None, 0, 0.0):
        raise WeightsFileError(f"{source}: shift_factor={raw['shift_factor']} is not supported")
    cfg = {k: raw[k] for k in CONFIG_FIELDS if k in raw and raw[k] is not None}
    if "block_out_channels" in cfg:
        cfg["block_out_channels"] = tuple(int(c) for c in cfg["block_out_channels"])
        n_types = len(raw.get("down_block_types", cfg["block_out_channels"]))
        if n_types != len(cfg["block_out_channels"]):
            raise WeightsFileError(f"{source}: {n_types} down_block_types but block_out_channels has "
                                  f"{len(cfg['block_out_channels'])} entries")
    return cfg


def infer_config(state: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Read block_out_channels, layers_per_block, latent/in/out channels off the weight shapes
    (norm_num_groups cannot be seen in shapes: 32, the only value used by SD VAEs)."""
    def shape(key):
        if key not in state:
            raise WeightsFileError(f"cannot infer the VAE configuration: key {key!r} is missing")
        return state[key].shape

    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    if not levels:
        raise WeightsFileError("cannot infer the VAE configuration: no 'encoder.down_blocks.*' keys "
                              "(is this a diffusers AutoencoderKL state_dict?)")
    chans = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in levels)
    layers = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
    return dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("decoder.conv_in.weight")[1],
        block_out_channels=chans,
        layers_per_block=layers,
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in state),
    )


# ----------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------
def canonical_key(key: str) -> str:
    """Old attention names -> current ones: `...attentions.0.query.weight` -> `...attentions.0.to_q.weight`."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in OLD_ATTENTION_NAMES and "attentions" in parts:
        return ".".join(parts[:-2] + OLD_ATTENTION_NAMES[parts[-2]].split(".") + parts[-1:])
    return key


def flax_path(key: str) -> Tuple[str, ...]:
    """`encoder.down_blocks.0.resnets.1.conv1.weight` ->
    ('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    out = []
    for p in canonical_key(key).split("."):
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out)


def _to_flax_leaf(key: str, value: np.ndarray, flax_name: str, expected: Tuple[int, ...]) -> np.ndarray:
    """Transpose one torch tensor into the layout of the Flax leaf `flax_name` with shape `expected`."""
    if flax_name == "kernel" and len(expected) == 4:  # conv: (O, I, kh, kw) -> (kh, kw, I, O)
        if value.ndim != 4:
            raise WeightsFileError(f"{key}: expected a 4-D conv weight for shape {expected}, got {value.shape}")
        value = value.transpose(2, 3, 1, 0)
    elif flax_name == "kernel":  # linear (O, I) -> (I, O); old checkpoints may store 1x1 convs (O, I, 1, 1)
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if value.ndim != 2:
            raise WeightsFileError(f"{key}: expected a 2-D linear weight for shape {expected}, got {value.shape}")
        value = value.T
    if tuple(value.shape) != tuple(expected):
        raise WeightsFileError(f"{key}: shape {tuple(value.shape)} (after layout change) does not match the Flax "
                              f"parameter {expected} of this VAE configuration")
    return np.ascontiguousarray(value, np.float32)


def expected_param_shapes(cfg: Mapping[str, Any]) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """{flax path: shape} of AutoencoderKL(**cfg), from an abstract init (no compute, no memory)."""
    vae = AutoencoderKL(**cfg)
    size = 2 * vae.downsample_factor
    shapes = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, vae.in_channels))))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes["params"]).items()}


def state_dict_to_params(state: Mapping[str, Any], cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """diffusers AutoencoderKL state_dict (NumPy or torch tensors) -> nested Flax params for AutoencoderKL(**cfg).

    Every Flax parameter must be filled exactly once and every torch key used; errors name the key.
    """
    expected = expected_param_shapes(cfg)
    leaf_names = {"weight": ("kernel", "scale"), "bias": ("bias",)}
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        value = np.asarray(value.float().numpy() if hasattr(value, "float") else value, np.float32)
        path = flax_path(key)
        target = None
        for name in leaf_names.get(path[-1], ()):
            if path[:-1] + (name,) in expected:
                target = path[:-1] + (name,)
        if target is None:
            unexpected.append(key)
            continue
        if target in flat:
            raise WeightsFileError(f"{key}: maps to Flax parameter {'/'.join(target)} which another key already "
                                  "filled (both old and new attention names present?)")
        flat[target] = _to_flax_leaf(key, value, target[-1], expected[target])
    missing = sorted(set(expected) - set(flat))
    if unexpected or missing:
        msg = []
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if missing:
            names = [".".join(p) for p in missing[:5]]
            msg.append(f"{len(missing)} Flax parameter(s) not filled, e.g. {names}")
        raise WeightsFileError(f"VAE state_dict does not match the configuration {dict(cfg)}: " + "; ".join(msg))
    assert len(flat) == len(expected) == len(state), (len(flat), len(expected), len(state))
    return unflatten_dict(flat)


def config_for(state: Mapping[str, np.ndarray], cfg_path: Optional[str], weights: str) -> Dict[str, Any]:
    """The configuration read off the weight shapes, completed by config.json when there is one."""
    cfg = infer_config(state)
    if cfg_path is not None:
        from_file = config_from_diffusers(json.loads(paths.as_path(cfg_path).read_text()), cfg_path)
        for k, v in cfg.items():  # a config.json that disagrees with the weight shapes is an error
            if k in from_file and from_file[k] != v:
                raise WeightsFileError(f"{cfg_path}: {k}={from_file[k]} but the weights in {weights} have {v}")
        cfg.update(from_file)
    return cfg


def load_diffusers_vae(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A diffusers VAE folder or .safetensors file -> (Flax params, AutoencoderKL keyword arguments)."""
    weights, cfg_path = find_vae_files(path)
    state = read_state_dict(weights)
    cfg = config_for(state, cfg_path, weights)
    return state_dict_to_params(state, cfg), cfg


def load_vae(source: str = "mse", dtype: Any = jnp.float32, cache_dir: Optional[str] = None
             ) -> Tuple[AutoencoderKL, Dict[str, Any]]:
    """-> (AutoencoderKL, params) from "mse" | "ema" (downloaded from the Hub) or a path (local or a bucket URL).

    A path may be a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or a pipeline folder
    with a `vae/` subfolder) or one .safetensors file (a config.json next to it is used, else the
    configuration is read off the weight shapes).
    """
    if source in ("mse", "ema"):
        source = vae_weights_path(source, cache_dir=cache_dir)
    params, cfg = load_diffusers_vae(source)
    return AutoencoderKL(**cfg, dtype=dtype), params
