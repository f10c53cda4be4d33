"""Converted / pretrained DiT weights on disk, loaded in one call.

A dit_jax model directory holds
    config.json   DiT keyword arguments (input_size, patch_size, hidden_size, depth, num_heads, ...) and a
                  checksum of every parameter array ("_checksums", dit_jax.utils.checksum)
    params/       the Flax `params` tree saved with orbax (float32 NumPy arrays)
Loading verifies the checksums, so flipped or truncated bytes are an error naming the arrays, never
silently wrong weights. Directories written before the blocks' parameters were stacked (`blocks_0` ...,
dit_jax/nn/param_layout.py) load too: their parameters are stacked on load, with a log line.

    save_pretrained(params, cfg, "out/DiT-XL-2-256")
    model, params = load_pretrained("out/DiT-XL-2-256")

PyTorch formats (.pt, .safetensors, diffusers folders) are read by `convert.load_any`, which also takes
these directories. A directory may be local or a bucket URL (gs://...): orbax writes and reads the params
there itself, and a bucket directory whose write was interrupted is refused (dit_jax.utils.atomic).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from dit_jax.utils.errors import DitJaxError
from dit_jax.model import DiT, abstract_params
from dit_jax.nn.param_layout import is_per_block, stack_blocks
from dit_jax.utils import paths
from dit_jax.utils.atomic import atomic_dir, check_complete, write_text
from dit_jax.utils.checksum import mismatches, tree_fingerprints

log = logging.getLogger("dit_jax")
CONFIG_NAME = "config.json"
PARAMS_NAME = "params"
FORMAT_TAG = "dit_jax"
# DiT fields written to config.json; the last two only when they differ from the release.
CONFIG_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "class_dropout_prob", "num_classes", "learn_sigma")
OPTIONAL_FIELDS = {"timestep_freq_shift": 0.0, "mlp_norm_eps": 1e-6}


class PretrainedError(DitJaxError, ValueError):
    """A model directory that cannot be read; the message names the file and what was expected."""


def config_to_json(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """DiT kwargs -> the plain dict stored in config.json (runtime options like dtype are not stored)."""
    out: Dict[str, Any] = {"_format": FORMAT_TAG}
    for k in CONFIG_FIELDS:
        if k in cfg:
            v = cfg[k]
            out[k] = v.item() if hasattr(v, "item") else v
    for k, default in OPTIONAL_FIELDS.items():
        if k in cfg and float(cfg[k]) != default:
            out[k] = float(cfg[k])
    return out


def config_from_json(data: Mapping[str, Any], path: str = CONFIG_NAME) -> Dict[str, Any]:
    allowed = set(CONFIG_FIELDS) | set(OPTIONAL_FIELDS)
    unknown = sorted(k for k in data if not k.startswith("_") and k not in allowed)
    if unknown:
        raise PretrainedError(f"{path}: unknown DiT fields {unknown}; expected a subset of {sorted(allowed)}")
    return {k: v for k, v in data.items() if k in allowed}


def model_config(model_or_cfg: Any) -> Dict[str, Any]:
    """The DiT kwargs that define the weights' shapes and maths, from a DiT module (or a dict, copied)."""
    if isinstance(model_or_cfg, DiT):
        return {k: getattr(model_or_cfg, k) for k in CONFIG_FIELDS + tuple(OPTIONAL_FIELDS)}
    return dict(model_or_cfg)


def save_pretrained(params: Mapping, cfg: Any, directory: paths.PathLike, overwrite: bool = False) -> str:
    """Writes config.json + orbax params/ to `directory` atomically (dit_jax.utils.atomic.atomic_dir).

    `cfg` is the DiT kwargs dict (as returned by convert.torch_to_flax) or a DiT module."""
    if "params" in params and len(params) == 1:  # accept {"params": ...} too
        params = params["params"]
    cfg = model_config(cfg)
    host = stack_blocks(jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(params)))
    check_params(host, cfg, directory)
    with atomic_dir(directory, overwrite) as tmp:
        write_text(tmp / CONFIG_NAME, json.dumps(dict(config_to_json(cfg), _checksums=tree_fingerprints(host)),
                                                 indent=2))
        ocp.PyTreeCheckpointer().save(tmp / PARAMS_NAME, host)
    return paths.display(directory)


def check_params(params: Mapping, cfg: Mapping[str, Any], where: str) -> None:
    """The params tree must have exactly the keys and shapes DiT(**cfg) creates."""
    want = flatten_dict(abstract_params(DiT(**cfg)), sep="/")
    got = flatten_dict(dict(params), sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise PretrainedError(f"{where}: params do not match DiT({_short(cfg)}): missing {missing[:6]}, "
                              f"unexpected {extra[:6]}")
    for k, s in want.items():
        if tuple(got[k].shape) != tuple(s.shape):
            raise PretrainedError(f"{where}: parameter {k!r} has shape {tuple(got[k].shape)}, expected "
                                  f"{tuple(s.shape)} for DiT({_short(cfg)})")


def _short(cfg: Mapping[str, Any]) -> str:
    keys = ("depth", "hidden_size", "patch_size", "input_size", "num_classes")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def read_config(directory: paths.PathLike) -> Dict[str, Any]:
    path = paths.join(directory, CONFIG_NAME)
    try:
        data = json.loads(paths.as_path(path).read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{directory}: no {CONFIG_NAME}; expected a directory written by "
                              f"save_pretrained / `dit-jax-convert to-flax`") from None
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if data.get("_format") != FORMAT_TAG:
        raise PretrainedError(f"{path}: not a dit_jax config (no \"_format\": \"{FORMAT_TAG}\"); a diffusers or "
                              f"PyTorch folder can be read with convert.load_any")
    return config_from_json(data, path)


def read_checksums(directory: paths.PathLike) -> Dict[str, int]:
    return json.loads(paths.as_path(paths.join(directory, CONFIG_NAME)).read_text()).get("_checksums", {})


def load_pretrained(directory: paths.PathLike, dtype: Any = None, **model_kwargs) -> Tuple[DiT, Dict[str, Any]]:
    """(DiT module, params) from a directory written by save_pretrained.

    `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters stay float32. Extra keyword arguments
    (remat=True, attention_impl="cudnn", ...) go to the DiT constructor."""
    directory = paths.display(directory)
    check_complete(directory)
    cfg = read_config(directory)
    params_dir = paths.join(directory, PARAMS_NAME)
    if not paths.as_path(params_dir).is_dir():
        raise PretrainedError(f"{directory}: no {PARAMS_NAME}/ folder with the orbax parameters")
    try:
        params = ocp.PyTreeCheckpointer().restore(paths.as_path(params_dir))
    except Exception as e:  # noqa: BLE001 -- orbax raises many kinds; name the directory
        raise PretrainedError(f"{params_dir}: cannot restore the orbax parameters ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    saved = params  # the checksums are of the tree as it was written
    if is_per_block(params):
        log.info("%s: parameters in the per-block layout of older dit_jax versions (blocks_0 ...); stacking "
                 "them into 'blocks' (`dit-jax-convert migrate` rewrites the directory once)", params_dir)
        params = stack_blocks(params)
    check_params(params, cfg, params_dir)
    expected = read_checksums(directory)
    bad = mismatches(expected, tree_fingerprints(saved)) if expected else []
    if bad:
        raise PretrainedError(f"{params_dir}: {len(bad)} parameter arrays do not match the checksums in "
                              f"{CONFIG_NAME} (first: {bad[0]}); the directory is damaged, convert it again")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    return DiT(**cfg, **model_kwargs), params


def is_pretrained_dir(path: paths.PathLike) -> bool:
    return paths.as_path(paths.join(path, PARAMS_NAME)).is_dir() and paths.is_file(paths.join(path, CONFIG_NAME))
