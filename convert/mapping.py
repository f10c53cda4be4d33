"""Release-layout PyTorch state_dict <-> Flax `params` tree for dit_jax.model.DiT.

Pure NumPy: nothing here imports torch, so the mapping is usable (and testable) without it. Arrays come in
as anything `np.asarray` takes (torch tensors are turned into NumPy by convert.io first).

The rename table maps block i's keys to the per-block paths `blocks_i/...`; the Flax tree stacks them into
`blocks/...` with a leading depth axis (dit_jax/nn/param_layout.py), and `params_to_state_dict` unstacks them
again (it also takes trees in the older per-block layout).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from flax.traverse_util import flatten_dict

from dit_jax.utils.errors import DitJaxError
from dit_jax.model import HEADS_BY_WIDTH
from dit_jax.nn.model_ops import get_2d_sincos_pos_embed
from dit_jax.nn.param_layout import stack_blocks, unstack_blocks


class ConversionError(DitJaxError, ValueError):
    """A checkpoint that cannot be converted; the message names the key/shape/file and what was expected."""


# One line per key family: torch key regex -> (flax path template, how the array is laid out); `blocks_i`
# paths are then stacked into `blocks` (block i is slice i of the depth axis).
#   "linear": torch (out, in) -> flax kernel (in, out); "vector": copied as is;
#   "conv": torch (D, C, p, q) -> flax (p, q, C, D); "table": embedding rows copied as is.
RENAME_TABLE = [
    (r"x_embedder\.proj\.weight", "x_embedder/kernel", "conv"),
    (r"x_embedder\.proj\.bias", "x_embedder/bias", "vector"),
    (r"t_embedder\.mlp\.(0|2)\.weight", "t_embedder/mlp_{0}/kernel", "linear"),
    (r"t_embedder\.mlp\.(0|2)\.bias", "t_embedder/mlp_{0}/bias", "vector"),
    (r"y_embedder\.embedding_table\.weight", "y_embedder/embedding_table/embedding", "table"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", "blocks_{0}/attn/{1}/kernel", "linear"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", "blocks_{0}/attn/{1}/bias", "vector"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.weight", "blocks_{0}/mlp/{1}/kernel", "linear"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.bias", "blocks_{0}/mlp/{1}/bias", "vector"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.weight", "blocks_{0}/adaLN_modulation_1/kernel", "linear"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.bias", "blocks_{0}/adaLN_modulation_1/bias", "vector"),
    (r"final_layer\.(linear|adaLN_modulation\.1)\.weight", "final_layer/{0}/kernel", "linear"),
    (r"final_layer\.(linear|adaLN_modulation\.1)\.bias", "final_layer/{0}/bias", "vector"),
]
POS_EMBED_KEY = "pos_embed"
PER_BLOCK_PATH = re.compile(r"blocks_\d+/")  # Flax paths of the older per-block layout, stacked afterwards
# Prefixes that wrappers add to keys: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _to_flax_layout(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return arr.T
    if kind == "conv":
        return arr.transpose(2, 3, 1, 0)
    return arr


def _to_torch_layout(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return arr.T
    if kind == "conv":
        return arr.transpose(3, 2, 0, 1)
    return arr


def _flax_path(torch_key: str) -> Tuple[str, str]:
    for pattern, template, kind in RENAME_TABLE:
        m = re.fullmatch(pattern, torch_key)
        if m:
            groups = [g.replace(".", "_") for g in m.groups()]
            return template.format(*groups), kind
    raise KeyError(torch_key)


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def infer_config(state: Mapping[str, np.ndarray], num_heads: Optional[int] = None,
                 input_size: Optional[int] = None, num_classes: Optional[int] = None) -> Dict[str, Any]:
    """DiT keyword arguments from the shapes of a release-layout state_dict."""
    for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"):
        if key not in state:
            raise ConversionError(
                f"missing key {key!r}: this does not look like a DiT state_dict "
                f"(first keys: {sorted(state)[:5]})")
    hidden, in_channels, p, q = state["x_embedder.proj.weight"].shape
    if p != q:
        raise ConversionError(f"x_embedder.proj.weight has a non-square patch {p}x{q}; DiT uses square patches")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    out_dim = state["final_layer.linear.weight"].shape[0]
    out_channels, rem = divmod(out_dim, p * p)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ConversionError(
            f"final_layer.linear.weight has {out_dim} outputs; expected patch^2 * in_channels "
            f"({p * p * in_channels}) or twice that with learned sigma ({2 * p * p * in_channels})")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is None:
        # The release always trains with class dropout, so the table carries one extra "null" row.
        num_classes, class_dropout_prob = rows - 1, 0.1
    elif rows == num_classes + 1:
        class_dropout_prob = 0.1
    elif rows == num_classes:
        class_dropout_prob = 0.0
    else:
        raise ConversionError(f"y_embedder.embedding_table.weight has {rows} rows; expected num_classes "
                              f"({num_classes}) or num_classes + 1 (with the null class)")
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise ConversionError(f"width {hidden} is not a standard DiT width {sorted(HEADS_BY_WIDTH)}: "
                                  f"heads cannot be read from shapes, pass num_heads explicitly")
        num_heads = HEADS_BY_WIDTH[hidden]
    if POS_EMBED_KEY in state:
        tokens = state[POS_EMBED_KEY].shape[1]
        grid = int(round(tokens**0.5))
        if grid * grid != tokens:
            raise ConversionError(f"pos_embed has {tokens} tokens, which is not a square grid")
        if input_size is not None and input_size != grid * p:
            raise ConversionError(f"pos_embed is for latent size {grid * p}, but input_size={input_size} was given")
        input_size = grid * p
    elif input_size is None:
        input_size = 32
        warnings.warn("no pos_embed in the checkpoint; assuming latent input_size=32 (256 px); "
                      "pass input_size for other resolutions")
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * hidden
    return dict(input_size=int(input_size), patch_size=int(p), in_channels=int(in_channels), hidden_size=int(hidden),
                depth=int(depth), num_heads=int(num_heads), mlp_ratio=mlp_hidden / hidden,
                class_dropout_prob=class_dropout_prob, num_classes=int(num_classes),
                learn_sigma=out_channels == 2 * in_channels)


def expected_torch_shapes(cfg: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Every key and shape a release DiT with this config has (pos_embed included)."""
    d, c, p = cfg["hidden_size"], cfg["in_channels"], cfg["patch_size"]
    mlp = int(d * cfg.get("mlp_ratio", 4.0))
    out = c * 2 if cfg.get("learn_sigma", True) else c
    rows = cfg["num_classes"] + int(cfg.get("class_dropout_prob", 0.1) > 0)
    grid = cfg["input_size"] // p
    shapes = {
        "pos_embed": (1, grid * grid, d),
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (rows, d),
    }
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * out, d), "final_layer.linear.bias": (p * p * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    })
    return shapes  # in the release's state_dict order


def check_state_dict(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any], require_pos_embed: bool) -> None:
    """Raises ConversionError naming every missing/unexpected key and the first wrong shape."""
    expected = expected_torch_shapes(cfg)
    if not require_pos_embed:
        expected.pop(POS_EMBED_KEY)
        state = {k: v for k, v in state.items() if k != POS_EMBED_KEY}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {POS_EMBED_KEY})
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != tuple(shape):
            problems.append(f"key {k!r} has shape {tuple(state[k].shape)}, expected {tuple(shape)} for "
                            f"DiT(depth={cfg['depth']}, hidden_size={cfg['hidden_size']}, "
                            f"patch_size={cfg['patch_size']})")
            break
    if problems:
        raise ConversionError("; ".join(problems))


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def state_dict_to_params(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any], check_pos_embed: bool = True) -> dict:
    """Release-layout state_dict (NumPy arrays) -> nested Flax params dict (float32 NumPy), blocks stacked."""
    check_state_dict(state, cfg, require_pos_embed=False)
    if check_pos_embed and POS_EMBED_KEY in state:
        fixed = get_2d_sincos_pos_embed(cfg["hidden_size"], cfg["input_size"] // cfg["patch_size"])
        got = np.asarray(state[POS_EMBED_KEY], np.float32).reshape(fixed.shape)
        err = float(np.max(np.abs(got - fixed)))
        if err > 1e-3:
            raise ConversionError(f"pos_embed differs from the fixed 2-D sin-cos table by {err:.3g}; dit_jax does "
                                  f"not train position embeddings, so these weights cannot be reproduced")
    params: dict = {}
    for key, value in state.items():
        if key == POS_EMBED_KEY:
            continue
        path, kind = _flax_path(key)
        arr = _to_flax_layout(np.asarray(value), kind)
        # stack_blocks copies the per-block arrays into new (depth, ...) ones: a contiguous copy first would
        # be a second pass over nearly all the weights (2.7 GB for DiT-XL/2)
        _set(params, path, arr if PER_BLOCK_PATH.match(path) else np.ascontiguousarray(arr))
    return stack_blocks(params, stack=_stack_c_order)


def _stack_c_order(arrays) -> np.ndarray:
    """(depth, ...) C-contiguous from the blocks' arrays (transposed views): one copy (np.stack would keep their
    Fortran order)."""
    out = np.empty((len(arrays),) + np.shape(arrays[0]), np.result_type(*arrays))
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _torch_key(flax_path: str) -> Tuple[str, str]:
    """Inverse of the rename table."""
    parts = flax_path.split("/")
    leaf = {"kernel": "weight", "bias": "bias", "embedding": "weight"}[parts[-1]]
    if parts[0] == "x_embedder":
        return f"x_embedder.proj.{leaf}", "conv" if leaf == "weight" else "vector"
    mods = []
    for p in parts[:-1]:
        m = re.fullmatch(r"(blocks|mlp|adaLN_modulation)_(\d+)", p)
        mods.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    key = ".".join(mods + [leaf])
    kind = "table" if parts[-1] == "embedding" else ("linear" if leaf == "weight" else "vector")
    return key, kind


def params_to_state_dict(params: Mapping, cfg: Optional[Mapping[str, Any]] = None) -> Dict[str, np.ndarray]:
    """Flax params -> release-layout state_dict of float32 NumPy arrays, pos_embed included.

    `cfg` (the DiT keyword arguments) is required: the release's pos_embed has one row per latent token,
    and no Flax parameter tells the latent size (pos_embed is a constant there, and every parameter shape
    is the same at 256 and 512 px).
    """
    if cfg is None or "input_size" not in cfg:
        raise ConversionError(
            "the latent size is not in Flax params (pos_embed is not a parameter there), so the release's "
            "pos_embed cannot be sized: pass the model config, e.g. convert.flax_to_torch(params, cfg) with "
            "the cfg from convert.torch_to_flax or the converted model's config.json (input_size 32 for "
            "256 px, 64 for 512 px)")
    try:
        flat = flatten_dict(unstack_blocks(dict(params)), sep="/")
    except ValueError as e:
        raise ConversionError(f"Flax params: {e}") from None
    state = {}
    for path, value in flat.items():
        try:
            key, kind = _torch_key(path)
        except (KeyError, AttributeError):
            raise ConversionError(f"unexpected Flax parameter {path!r}: not part of a DiT") from None
        state[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), kind))
    d = state["x_embedder.proj.weight"].shape[0]
    grid = cfg["input_size"] // cfg["patch_size"]
    state[POS_EMBED_KEY] = get_2d_sincos_pos_embed(d, grid)[None]
    check_state_dict(state, cfg, require_pos_embed=True)
    order = list(expected_torch_shapes(cfg))  # the release's key order
    return {k: state[k] for k in order}
