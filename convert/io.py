"""Reading checkpoints from disk into state dicts.

Formats: `.pt/.pth/.bin` written by `torch.save` (release files, train.py checkpoints, diffusers `.bin`),
`.safetensors`, and diffusers folders (a `DiTTransformer2DModel` folder, or a pipeline folder with a
`transformer/` subfolder). The format is recognised from the file's first bytes, not only its suffix.

torch is imported only for pickled files; `.safetensors` and diffusers safetensors folders are read with
NumPy alone. Pickles are read with `torch.load(weights_only=True)` unless the caller passes
`allow_pickle=True`: an arbitrary pickle can run code when it is loaded.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from convert.mapping import ConversionError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EXPECTED = ("a DiT checkpoint: a .pt/.pth/.bin file written by torch.save, a .safetensors file, "
            "a diffusers DiTTransformer2DModel folder, or a dit_jax Flax directory")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # legacy (non-zip) torch.save files start with a pickle protocol opcode


@dataclass
class Checkpoint:
    """What was read: the object (a state dict or a train.py checkpoint dict) and where it came from."""

    obj: Mapping[str, Any]
    path: str
    format: str  # "torch", "safetensors" or "diffusers"
    diffusers_config: Optional[Dict[str, Any]] = None  # config.json of a diffusers folder
    metadata: Dict[str, str] = field(default_factory=dict)


def _size_str(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------------------------------------------
# torch.save files
# ----------------------------------------------------------------------------------------------------
def load_torch_file(path: str, allow_pickle: bool = False) -> Any:
    """torch.load on CPU; weights_only=True unless allow_pickle. Errors become ConversionError."""
    import pickle

    import torch

    try:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        import argparse

        # The release train.py stores its argparse.Namespace under "args"; rebuilding a Namespace runs no
        # code (its values still pass through the restricted unpickler), so it is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            detail = next((line.strip() for line in msg.splitlines() if "Unsupported" in line), "")
            detail = detail.split(" Please use")[0].replace("WeightsUnpickler error: ", "")  # drop torch's advice
            raise ConversionError(
                f"{path}: refused to unpickle objects other than tensors and plain containers "
                f"({detail or 'weights_only=True failed'}). A pickle can run arbitrary code when loaded; "
                f"if you trust where this file came from, pass --unsafe-pickle (allow_pickle=True) to load it "
                f"with torch.load(weights_only=False)") from None
        raise ConversionError(f"{path}: not a readable torch.save file ({msg.splitlines()[0] if msg else e!r}); "
                              f"expected {EXPECTED}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise ConversionError(f"{path}: truncated or corrupt torch.save file ({first}); expected {EXPECTED}") from None


# ----------------------------------------------------------------------------------------------------
# safetensors (read with NumPy; bfloat16 via ml_dtypes, which JAX depends on)
# ----------------------------------------------------------------------------------------------------
def _safetensors_dtype(name: str):
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    if name == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in table:
        raise KeyError(name)
    return table[name]


def load_safetensors_file(path: str) -> tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(state dict of NumPy arrays, floating point ones as float32; the file's __metadata__)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: {size}-byte file is too short for a .safetensors file; expected {EXPECTED}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise ConversionError(f"{path}: not a .safetensors file (header length {n} does not fit the "
                                  f"{size}-byte file); the file is truncated or not a checkpoint")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: not a .safetensors file (bad JSON header: {e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: not a .safetensors file (header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        need = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + need > size:
            raise ConversionError(f"{path}: truncated .safetensors file: the header describes {8 + n + need} "
                                  f"bytes but the file has {size}")
        state: Dict[str, np.ndarray] = {}
        if not header:
            return state, metadata
        for key, info in header.items():
            try:
                dtype = np.dtype(_safetensors_dtype(info["dtype"]))
                start, end = (int(o) for o in info["data_offsets"])
                f.seek(8 + n + start)
                arr = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize).reshape(info["shape"])
            except (KeyError, ValueError, TypeError) as e:
                raise ConversionError(f"{path}: bad .safetensors entry for key {key!r} ({e!r})") from None
            floating = np.issubdtype(arr.dtype, np.floating) or info["dtype"] == "BF16"
            state[key] = arr.astype(np.float32, copy=False) if floating else arr
    return state, metadata


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------
def find_diffusers_folder(path: str) -> Optional[str]:
    """The folder holding a DiTTransformer2DModel (itself, or its transformer/ subfolder), or None."""
    for d in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(d, "config.json")) and any(
                os.path.isfile(os.path.join(d, w)) for w in DIFFUSERS_WEIGHTS):
            return d
    return None


def _read_diffusers(folder: str, allow_pickle: bool, log: Callable[[str], None]) -> Checkpoint:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{cfg_path}: cannot read the diffusers config ({e})") from None
    cls = config.get("_class_name")
    if cls not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise ConversionError(f"{cfg_path}: _class_name is {cls!r}; expected a DiTTransformer2DModel folder")
    st = os.path.join(folder, DIFFUSERS_WEIGHTS[0])
    if os.path.isfile(st):
        inner = read_file(st, allow_pickle, log)
    else:
        inner = read_file(os.path.join(folder, DIFFUSERS_WEIGHTS[1]), allow_pickle, log)
    return Checkpoint(inner.obj, folder, "diffusers", diffusers_config=config, metadata=inner.metadata)


def read_file(path: str, allow_pickle: bool = False, log: Callable[[str], None] = lambda s: None) -> Checkpoint:
    """One file: recognised by its first bytes (zip or pickle -> torch.load, JSON header -> safetensors)."""
    size = os.path.getsize(path)
    log(f"reading {path} ({_size_str(size)})")
    with open(path, "rb") as f:
        head = f.read(16)
    lower = path.lower()
    if head.startswith(_ZIP_MAGIC) or (head[:1] and head[0] == _PICKLE_PROTO):
        return Checkpoint(load_torch_file(path, allow_pickle), path, "torch")
    if len(head) >= 9 and head[8:9] == b"{" or lower.endswith(".safetensors"):
        state, meta = load_safetensors_file(path)
        return Checkpoint(state, path, "safetensors", metadata=meta)
    if lower.endswith(TORCH_SUFFIXES):
        # Right suffix, wrong content: most often a cut-off download.
        raise ConversionError(f"{path}: truncated or not a torch.save file (it does not start like a zip "
                              f"archive or a pickle; first bytes {head[:8]!r}); expected {EXPECTED}")
    raise ConversionError(f"{path}: not a checkpoint (first bytes {head[:8]!r}); expected {EXPECTED}")


def read_checkpoint(path: str, allow_pickle: bool = False, log: Callable[[str], None] = lambda s: None) -> Checkpoint:
    """A checkpoint file or diffusers folder -> Checkpoint (not yet converted)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory; expected {EXPECTED}")
    if os.path.isdir(path):
        folder = find_diffusers_folder(path)
        if folder is None:
            raise ConversionError(f"{path}: directory without config.json and {' or '.join(DIFFUSERS_WEIGHTS)} "
                                  f"(nor a transformer/ subfolder holding them); expected {EXPECTED}")
        return _read_diffusers(folder, allow_pickle, log)
    return read_file(path, allow_pickle, log)


def is_flax_dir(path: str) -> bool:
    """A directory written by dit_jax.pretrained.save_pretrained (config.json + params/)."""
    return os.path.isdir(os.path.join(path, "params")) and os.path.isfile(os.path.join(path, "config.json"))
