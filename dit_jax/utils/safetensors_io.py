"""Reading `.safetensors` weight files with NumPy alone (bfloat16 through ml_dtypes, which JAX depends on).

The one reader of the format in the project: the DiT converter and the VAE loader both call it, so a
truncated or foreign file gets the same message everywhere.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Tuple

import ml_dtypes
import numpy as np

from dit_jax.utils import paths
from dit_jax.utils.errors import DitJaxError

MAX_HEADER_BYTES = 100 * 2**20
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class WeightsFileError(DitJaxError, ValueError):
    """A weights file that cannot be read; the message names the file and what is wrong with it."""


def looks_like_safetensors(path: paths.PathLike) -> bool:
    """True when the file starts like a .safetensors file (an 8-byte length, then a JSON object)."""
    with paths.as_path(path).open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: paths.PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(state dict of NumPy arrays with floating point ones as float32, the file's __metadata__); a local path
    or a bucket URL."""
    where = paths.as_path(path)
    path = os.fspath(path)
    size = where.stat().length
    with where.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsFileError(f"{path}: {size}-byte file is too short for a .safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise WeightsFileError(f"{path}: not a .safetensors file (header length {n} does not fit the "
                                   f"{size}-byte file); the file is truncated or not a checkpoint")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"{path}: not a .safetensors file (bad JSON header: {e})") from None
        if not isinstance(header, dict):
            raise WeightsFileError(f"{path}: not a .safetensors file (header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        try:
            need = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise WeightsFileError(f"{path}: not a .safetensors file (bad tensor entry: {e!r})") from None
        if 8 + n + need > size:
            raise WeightsFileError(f"{path}: truncated .safetensors file: the header describes {8 + n + need} "
                                   f"bytes but the file has {size}")
        state: Dict[str, np.ndarray] = {}
        for key, info in header.items():
            try:
                dtype = np.dtype(_DTYPES[info["dtype"]])
                start, end = (int(o) for o in info["data_offsets"])
                f.seek(8 + n + start)
                buf = bytearray(end - start)  # writable, filled in place (also from a bucket's file object)
                if f.readinto(buf) != len(buf):
                    raise ValueError(f"{len(buf)} bytes at offset {8 + n + start} cannot be read")
                arr = np.frombuffer(buf, dtype=dtype).reshape(info["shape"])
            except (KeyError, ValueError, TypeError) as e:
                raise WeightsFileError(f"{path}: bad .safetensors entry for key {key!r} ({e!r})") from None
            floating = np.issubdtype(arr.dtype, np.floating) or info["dtype"] == "BF16"
            state[key] = arr.astype(np.float32, copy=False) if floating else arr
    return state, metadata
