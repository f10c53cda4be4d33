"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> the Flax FID Inception params.

    params = inception_params()                 # cached converted file, else download the .pth, convert, cache
    params = inception_params("my/pt_inception-2015-12-05-6726825d.pth")   # a local .pth (converted, cached)
    params = inception_params("inception-2015-12-05-flax.npz")              # an already converted file
    params = inception_torch_to_flax(state_dict)                            # the conversion itself

    python -m convert.inception_weights [IN.pth] [OUT.npz]   # convert once (default: the cache)

Each torchvision BasicConv2d (conv without bias, BatchNorm eps 1e-3, ReLU) becomes one convolution with a
bias: kernel = W * gamma / sqrt(var + eps) (OIHW -> HWIO), bias = beta - mean * gamma / sqrt(var + eps),
computed in float64. fc.weight (1008, 2048) becomes fc/kernel (2048, 1008). torch is imported only to read
a .pth; a converted .npz loads without it.
"""
from __future__ import annotations

import os
import sys
import zipfile
from typing import Any, Dict, Mapping, Optional

import numpy as np

from convert.io import load_torch_file
from convert.mapping import ConversionError
from dit_jax.evaluation import weights as W
from dit_jax.evaluation.inception import BN_EPS, NUM_CLASSES, POOL_DIM, arch
from dit_jax.utils import paths

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")  # + num_batches_tracked, ignored


def torch_keys() -> Dict[str, tuple]:
    """Every key pytorch-fid's FID Inception state dict holds (without num_batches_tracked) -> its shape."""
    keys: Dict[str, tuple] = {}
    for path, (_, cin, cout, (kh, kw), _, _) in arch():
        prefix = path.replace("/", ".")
        keys[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for f in BN_FIELDS:
            keys[f"{prefix}.bn.{f}"] = (cout,)
    keys["fc.weight"] = (NUM_CLASSES, POOL_DIM)
    keys["fc.bias"] = (NUM_CLASSES,)
    return keys


def _numpy(v: Any, key: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().float().numpy()
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise ConversionError(f"{key}: expected a floating-point tensor, got dtype {a.dtype}")
    return a.astype(np.float64)


def inception_torch_to_flax(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """pytorch-fid state dict (tensors or arrays) -> Flax params tree (float32 NumPy), BatchNorms folded."""
    want = torch_keys()
    got = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ConversionError(f"not pytorch-fid's FID Inception state dict: {len(missing)} keys missing "
                              f"(first {missing[:3]}), {len(extra)} unexpected (first {extra[:3]})")
    sd = {}
    for k, shape in want.items():
        a = _numpy(got[k], k)
        if a.shape != shape:
            raise ConversionError(f"{k}: shape {a.shape}, expected {shape} (FID Inception)")
        sd[k] = a
    flat: Dict[str, np.ndarray] = {}
    for path, _ in arch():
        p = path.replace("/", ".")
        scale = sd[f"{p}.bn.weight"] / np.sqrt(sd[f"{p}.bn.running_var"] + BN_EPS)  # (O,)
        kernel = sd[f"{p}.conv.weight"].transpose(2, 3, 1, 0) * scale  # OIHW -> HWIO, scaled per output
        flat[f"{path}/kernel"] = kernel.astype(np.float32)
        flat[f"{path}/bias"] = (sd[f"{p}.bn.bias"] - sd[f"{p}.bn.running_mean"] * scale).astype(np.float32)
    flat["fc/kernel"] = sd["fc.weight"].T.astype(np.float32)
    flat["fc/bias"] = sd["fc.bias"].astype(np.float32)
    assert len(flat) == 2 * len(arch()) + 2, len(flat)
    params = W.unflatten(flat)
    W.check_params(params, "converted Inception")
    return params


def convert_file(pth_path: str, out_path: str) -> Dict[str, Any]:
    """Reads a .pth with torch.load(weights_only=True), converts, writes the .npz atomically."""
    obj = load_torch_file(pth_path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{pth_path}: expected a state dict, found {type(obj).__name__}")
    try:
        params = inception_torch_to_flax(obj)
    except ConversionError as e:
        raise ConversionError(f"{pth_path}: {e}") from None
    W.save_params(params, out_path)
    return params


def _is_npz(path: paths.PathLike) -> bool:
    with paths.as_path(path).open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return False
        f.seek(0)
        with zipfile.ZipFile(f) as z:  # a torch zip file holds data.pkl, an .npz holds *.npy
            return any(n.endswith(".npy") for n in z.namelist())


def inception_params(path: Optional[str] = None, cache_dir: Optional[str] = None, progress: bool = True,
                     log=lambda s: None) -> Dict[str, Any]:
    """The Flax FID Inception params (what a `--inception PATH` flag resolves to).

    path: a converted .npz, or pytorch-fid's .pth (converted once; cached in the cache folder under the start
    of the file's sha256), local or a bucket URL, or None: the cached converted file, else the .pth
    downloaded into the cache (DIT_JAX_CACHE) and converted once."""
    if path is not None:
        path = os.fspath(path)
        if not paths.is_file(path):
            raise W.InceptionWeightsError(f"--inception {path}: no such file (expected pytorch-fid's {W.PTH_NAME} "
                                          f"or a converted {W.CONVERTED_NAME})")
        if _is_npz(path):
            return W.load_params(path)
        out = os.path.join(os.path.dirname(W.converted_cache_path(cache_dir)),
                           f"inception-{W.sha256_hex(path)[:16]}-flax.npz")  # one converted file per .pth content
        if os.path.isfile(out):
            return W.load_params(out)
        log(f"converting {path} -> {out}")
        return convert_file(path, out)
    cached = W.converted_cache_path(cache_dir)
    if os.path.isfile(cached):
        return W.load_params(cached)
    pth = W.inception_pth_path(cache_dir, progress=progress)
    log(f"converting {pth} -> {cached}")
    return convert_file(pth, cached)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 2 or any(a.startswith("-") for a in argv):
        raise SystemExit("usage: python -m convert.inception_weights [IN.pth] [OUT.npz]")
    src = argv[0] if argv else None
    try:
        if src is None:
            src = W.inception_pth_path()
        out = argv[1] if len(argv) > 1 else W.converted_cache_path()
        convert_file(src, out)
    except (ConversionError, W.InceptionWeightsError, W.DownloadError) as e:
        raise SystemExit(f"error: {e}") from None
    print(out)


if __name__ == "__main__":
    main()
