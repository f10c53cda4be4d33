"""FID Inception weights on disk, without torch: the converted `.npz`, the cache, and the `.pth` download.

    params = load_params("inception-2015-12-05-flax.npz")   # the converted tree (float32 NumPy)
    save_params(params, path)                                # atomic; what the converter writes
    pth = inception_pth_path()                               # pytorch-fid's .pth in the cache, downloaded once

The `.pth` (pytorch-fid's port of the TensorFlow graph) is a torch pickle, so turning it into params is the
converter's job (convert/inception_weights.py, which the command lines call); the core only reads the
converted file: one `.npz` whose keys are the parameter paths ("Mixed_5b/branch1x1/kernel") plus a format
tag. Environment: DIT_JAX_CACHE (cache folder), DIT_JAX_INCEPTION_URL (a mirror of the .pth, used by tests).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from dit_jax.evaluation.inception import param_shapes
from dit_jax.utils import paths
from dit_jax.utils.atomic import atomic_path
from dit_jax.utils.download import DownloadError, default_cache_dir, download_file
from dit_jax.utils.errors import DitJaxError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the name carries the start of the file's sha256
CONVERTED_NAME = "inception-2015-12-05-flax.npz"
FORMAT_KEY, FORMAT_TAG = "__format__", "dit_jax-fid-inception-v1"


class InceptionWeightsError(DitJaxError, ValueError):
    """Weights that are missing or do not fit the network; the message names the file and what to do."""


def converted_cache_path(cache_dir: Optional[str] = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), CONVERTED_NAME)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten(v, path) if isinstance(v, Mapping) else {path: v})
    return out


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for k, v in flat.items():
        *path, leaf = k.split("/")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def check_params(params: Mapping[str, Any], where: str) -> None:
    """Exactly the parameters of InceptionV3 with their shapes, or an error naming the first difference."""
    want, got = param_shapes(), flatten(params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise InceptionWeightsError(f"{where}: not the FID Inception parameters: {len(missing)} missing "
                                    f"(first {missing[:3]}), {len(extra)} unexpected (first {extra[:3]})")
    for k, shape in want.items():
        if tuple(np.shape(got[k])) != shape:
            raise InceptionWeightsError(f"{where}: parameter {k!r} has shape {tuple(np.shape(got[k]))}, "
                                        f"expected {shape}")


def save_params(params: Mapping[str, Any], path: paths.PathLike) -> str:
    """Writes the converted tree as one .npz, atomically (a local path or a bucket URL)."""
    check_params(params, path)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, **{FORMAT_KEY: np.asarray(FORMAT_TAG)}, **flat)
    return path


def load_params(path: paths.PathLike) -> Dict[str, Any]:
    """The converted tree from `save_params`' .npz (float32 NumPy arrays); a local path or a bucket URL."""
    try:
        with paths.as_path(path).open("rb") as raw, np.load(raw, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InceptionWeightsError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise InceptionWeightsError(f"{path}: not a converted Inception .npz ({e})") from None
    tag = flat.pop(FORMAT_KEY, None)
    if tag is None or str(tag) != FORMAT_TAG:
        raise InceptionWeightsError(f"{path}: not a converted FID Inception file (no {FORMAT_KEY}={FORMAT_TAG!r}); "
                                    f"convert pytorch-fid's {PTH_NAME} with `python -m convert.inception_weights`")
    params = unflatten({k: v.astype(np.float32) for k, v in flat.items()})
    check_params(params, path)
    return params


def sha256_hex(path: paths.PathLike) -> str:
    h = hashlib.sha256()
    with paths.as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_pth_path(cache_dir: Optional[str] = None, url: Optional[str] = None, progress: bool = True) -> str:
    """pytorch-fid's weight file in the cache, downloaded once from pytorch-fid's URL (or DIT_JAX_INCEPTION_URL,
    a mirror of the same file); a download whose sha256 does not start with PTH_SHA256_PREFIX is deleted."""
    cache_dir = cache_dir or default_cache_dir()
    dest = os.path.join(cache_dir, PTH_NAME)
    if os.path.isfile(dest):
        return dest
    url = url or os.environ.get("DIT_JAX_INCEPTION_URL") or FID_WEIGHTS_URL
    try:
        download_file(url, dest, progress=progress)
        if not sha256_hex(dest).startswith(PTH_SHA256_PREFIX):
            os.remove(dest)
            raise DownloadError(f"{url}: the file's sha256 does not start with {PTH_SHA256_PREFIX} as its name "
                                "says; the corrupt download was deleted")
    except (DownloadError, OSError) as e:
        raise DownloadError(
            f"Could not download the FID Inception weights: {e}\n"
            f"Download {PTH_NAME} from {url} (e.g. `curl -L -o {dest} {url}`) and put it at {dest} "
            f"(or set DIT_JAX_CACHE to the folder that holds it), or pass `--inception PATH` with a local "
            f"weights file.") from e
    return dest
