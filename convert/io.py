"""Reading checkpoints from disk into state dicts.

Formats: `.pt/.pth/.bin` written by `torch.save` (release files, train.py checkpoints, diffusers `.bin`),
`.safetensors`, and diffusers folders (a `DiTTransformer2DModel` folder, or a pipeline folder with a
`transformer/` subfolder). The format is recognised from the file's first bytes, not only its suffix.

`.safetensors` and diffusers safetensors folders are read with NumPy (dit_jax.utils.safetensors_io). Pickles are
read with `torch.load(weights_only=True)` unless the caller passes `allow_pickle=True`: an arbitrary pickle can
run code when it is loaded. Every path may be local or a bucket URL (gs://...; dit_jax.utils.paths).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from convert.mapping import ConversionError
from dit_jax.utils import paths
from dit_jax.utils.atomic import check_complete
from dit_jax.utils.safetensors_io import WeightsFileError, read_safetensors

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
def _torch_load(path: paths.PathLike, weights_only: bool) -> Any:
    import torch  # optional stack (the `torch` extra): only pickled files need it

    if not paths.is_url(path):
        return torch.load(os.fspath(path), map_location="cpu", weights_only=weights_only)
    with paths.as_path(path).open("rb") as f:  # torch.load reads a seekable file object as well
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def load_torch_file(path: paths.PathLike, allow_pickle: bool = False) -> Any:
    """torch.load on CPU; weights_only=True unless allow_pickle. Errors become ConversionError."""
    import torch  # optional stack (the `torch` extra): only pickled files need it

    path = os.fspath(path)
    try:
        if allow_pickle:
            return _torch_load(path, weights_only=False)
        # The release train.py stores its argparse.Namespace under "args"; rebuilding a Namespace runs no
        # code (its values still pass through the restricted unpickler), so it is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _torch_load(path, weights_only=True)
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
# safetensors (the project's NumPy reader)
# ----------------------------------------------------------------------------------------------------
def load_safetensors_file(path: paths.PathLike) -> tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(state dict of NumPy arrays, floating point ones as float32; the file's __metadata__)."""
    try:
        return read_safetensors(path)
    except WeightsFileError as e:
        raise ConversionError(f"{e}; expected {EXPECTED}") from None


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------
def find_diffusers_folder(path: paths.PathLike) -> Optional[str]:
    """The folder holding a DiTTransformer2DModel (itself, or its transformer/ subfolder), or None."""
    path = os.fspath(path)
    for d in (path, paths.join(path, "transformer")):
        if paths.is_file(paths.join(d, "config.json")) and any(
                paths.is_file(paths.join(d, w)) for w in DIFFUSERS_WEIGHTS):
            return d
    return None


def _read_diffusers(folder: str, allow_pickle: bool, log: Callable[[str], None]) -> Checkpoint:
    cfg_path = paths.join(folder, "config.json")
    try:
        config = json.loads(paths.as_path(cfg_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{cfg_path}: cannot read the diffusers config ({e})") from None
    cls = config.get("_class_name")
    if cls not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise ConversionError(f"{cfg_path}: _class_name is {cls!r}; expected a DiTTransformer2DModel folder")
    st, pt = (paths.join(folder, name) for name in DIFFUSERS_WEIGHTS)
    inner = read_file(st if paths.is_file(st) else pt, allow_pickle, log)
    return Checkpoint(inner.obj, folder, "diffusers", diffusers_config=config, metadata=inner.metadata)


def read_file(path: str, allow_pickle: bool = False, log: Callable[[str], None] = lambda s: None) -> Checkpoint:
    """One file: recognised by its first bytes (zip or pickle -> torch.load, JSON header -> safetensors)."""
    where = paths.as_path(path)
    size = where.stat().length
    log(f"reading {path} ({_size_str(size)})")
    with where.open("rb") as f:
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
    where = paths.as_path(path)
    if not where.exists():
        raise ConversionError(f"{path}: no such file or directory; expected {EXPECTED}")
    if where.is_dir():
        check_complete(where)
        folder = find_diffusers_folder(path)
        if folder is None:
            raise ConversionError(f"{path}: directory without config.json and {' or '.join(DIFFUSERS_WEIGHTS)} "
                                  f"(nor a transformer/ subfolder holding them); expected {EXPECTED}")
        return _read_diffusers(folder, allow_pickle, log)
    return read_file(path, allow_pickle, log)

