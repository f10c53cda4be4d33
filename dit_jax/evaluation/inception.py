"""The FID Inception network in Flax: the 2015-12-05 TensorFlow graph as pytorch-fid ports it.

    net = InceptionV3()                                  # dtype=jnp.bfloat16 for bf16 compute
    out = net.apply({"params": params}, images)          # images: uint8 (N, H, W, 3), any H and W
    out["pool"]      # (N, 2048) pool_3 features (FID, precision/recall)
    out["spatial"]   # (N, 2023) first 7 channels of mixed_6/conv (= Mixed_6d.branch1x1), flattened (h, w, c): sFID
    out["logits"]    # (N, 1008) the classifier, pool @ kernel + bias (pytorch-fid's fc)
    out["logits_unbiased"]  # (N, 1008) pool @ kernel: what ADM's Inception Score takes the softmax of

Input handling follows pytorch-fid: x / 255, bilinear resize to 299 x 299 (half-pixel centres, no
antialiasing: torch's `interpolate(..., align_corners=False)`), then 2x - 1. The blocks are pytorch-fid's
FIDInceptionA/C/E: average pools exclude the padding from the count, and Mixed_7c pools with a max.

Parameters mirror the PyTorch module names ("Mixed_5b" -> "branch1x1" -> {kernel (kh, kw, in, out), bias}) with
each BatchNorm folded into its convolution (convert/inception_weights.py does the folding). ARCH is the one
table of layers: the module, the converter and the parameter check all read it.

`fuse=True` (the default, faster) runs all 1x1 convolutions that read a block's input as one convolution,
and applies the FID blocks' average pool after the pool branch's 1x1 convolution instead of before (both
are linear per pixel, so the result is the same up to rounding).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIZE = 299  # the network's input resolution
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_BLOCK, SPATIAL_CONV, SPATIAL_CHANNELS = "Mixed_6d", "branch1x1", 7  # ADM's mixed_6/conv:0[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3  # torchvision BasicConv2d's BatchNorm eps (folded by the converter)

# One convolution: (name, in, out, (kh, kw), stride, padded). padded: (kh // 2, kw // 2) zeros, else none.
Conv = Tuple[str, int, int, Tuple[int, int], int, bool]


def _convs_a(cin: int, pool: int) -> List[Conv]:
    return [("branch1x1", cin, 64, (1, 1), 1, False), ("branch5x5_1", cin, 48, (1, 1), 1, False),
            ("branch5x5_2", 48, 64, (5, 5), 1, True), ("branch3x3dbl_1", cin, 64, (1, 1), 1, False),
            ("branch3x3dbl_2", 64, 96, (3, 3), 1, True), ("branch3x3dbl_3", 96, 96, (3, 3), 1, True),
            ("branch_pool", cin, pool, (1, 1), 1, False)]


def _convs_b(cin: int) -> List[Conv]:
    return [("branch3x3", cin, 384, (3, 3), 2, False), ("branch3x3dbl_1", cin, 64, (1, 1), 1, False),
            ("branch3x3dbl_2", 64, 96, (3, 3), 1, True), ("branch3x3dbl_3", 96, 96, (3, 3), 2, False)]


def _convs_c(cin: int, c7: int) -> List[Conv]:
    return [("branch1x1", cin, 192, (1, 1), 1, False), ("branch7x7_1", cin, c7, (1, 1), 1, False),
            ("branch7x7_2", c7, c7, (1, 7), 1, True), ("branch7x7_3", c7, 192, (7, 1), 1, True),
            ("branch7x7dbl_1", cin, c7, (1, 1), 1, False), ("branch7x7dbl_2", c7, c7, (7, 1), 1, True),
            ("branch7x7dbl_3", c7, c7, (1, 7), 1, True), ("branch7x7dbl_4", c7, c7, (7, 1), 1, True),
            ("branch7x7dbl_5", c7, 192, (1, 7), 1, True), ("branch_pool", cin, 192, (1, 1), 1, False)]


def _convs_d(cin: int) -> List[Conv]:
    return [("branch3x3_1", cin, 192, (1, 1), 1, False), ("branch3x3_2", 192, 320, (3, 3), 2, False),
            ("branch7x7x3_1", cin, 192, (1, 1), 1, False), ("branch7x7x3_2", 192, 192, (1, 7), 1, True),
            ("branch7x7x3_3", 192, 192, (7, 1), 1, True), ("branch7x7x3_4", 192, 192, (3, 3), 2, False)]


def _convs_e(cin: int) -> List[Conv]:
    return [("branch1x1", cin, 320, (1, 1), 1, False), ("branch3x3_1", cin, 384, (1, 1), 1, False),
            ("branch3x3_2a", 384, 384, (1, 3), 1, True), ("branch3x3_2b", 384, 384, (3, 1), 1, True),
            ("branch3x3dbl_1", cin, 448, (1, 1), 1, False), ("branch3x3dbl_2", 448, 384, (3, 3), 1, True),
            ("branch3x3dbl_3a", 384, 384, (1, 3), 1, True), ("branch3x3dbl_3b", 384, 384, (3, 1), 1, True),
            ("branch_pool", cin, 192, (1, 1), 1, False)]


STEM: List[Conv] = [("Conv2d_1a_3x3", 3, 32, (3, 3), 2, False), ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, False),
                    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, True), ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, False),
                    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, False)]
# (block name, kind, its convolutions); kind "E_avg" is FIDInceptionE_1, "E_max" FIDInceptionE_2.
BLOCKS: List[Tuple[str, str, List[Conv]]] = [
    ("Mixed_5b", "A", _convs_a(192, 32)), ("Mixed_5c", "A", _convs_a(256, 64)), ("Mixed_5d", "A", _convs_a(288, 64)),
    ("Mixed_6a", "B", _convs_b(288)),
    ("Mixed_6b", "C", _convs_c(768, 128)), ("Mixed_6c", "C", _convs_c(768, 160)),
    ("Mixed_6d", "C", _convs_c(768, 160)), ("Mixed_6e", "C", _convs_c(768, 192)),
    ("Mixed_7a", "D", _convs_d(768)),
    ("Mixed_7b", "E_avg", _convs_e(1280)), ("Mixed_7c", "E_max", _convs_e(2048)),
]
# The 1x1 convolutions that read a block's input (fused into one with fuse=True), in output-channel order.
HEADS = {"A": ("branch1x1", "branch5x5_1", "branch3x3dbl_1", "branch_pool"),
         "B": ("branch3x3dbl_1",),
         "C": ("branch1x1", "branch7x7_1", "branch7x7dbl_1", "branch_pool"),
         "D": ("branch3x3_1", "branch7x7x3_1"),
         "E_avg": ("branch1x1", "branch3x3_1", "branch3x3dbl_1", "branch_pool"),
         "E_max": ("branch1x1", "branch3x3_1", "branch3x3dbl_1")}


def arch() -> List[Tuple[str, Conv]]:
    """Every convolution as (parameter path "Block/conv" or "Conv2d_xx", spec), in network order."""
    out = [(c[0], c) for c in STEM]
    for block, _, convs in BLOCKS:
        out += [(f"{block}/{c[0]}", c) for c in convs]
    return out


def param_shapes() -> Dict[str, Tuple[int, ...]]:
    """{"Mixed_5b/branch1x1/kernel": (1, 1, 192, 64), ...} for every parameter, fc included."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for path, (_, cin, cout, (kh, kw), _, _) in arch():
        shapes[f"{path}/kernel"] = (kh, kw, cin, cout)
        shapes[f"{path}/bias"] = (cout,)
    shapes["fc/kernel"] = (POOL_DIM, NUM_CLASSES)
    shapes["fc/bias"] = (NUM_CLASSES,)
    return shapes


# ----------------------------------------------------------------------------------------------- input


def resize_matrix(in_size: int, out_size: int = SIZE) -> np.ndarray:
    """(out, in) float32 weights of torch's bilinear interpolate with align_corners=False (no antialias).

    Source coordinate (d + 0.5) * in/out - 0.5, clamped at 0; the right neighbour is clamped at the edge."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), np.float32(1) - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) (N, H, W, 3) -> float32 (N, 299, 299, 3) in [-1, 1], as pytorch-fid."""
    x = images.astype(jnp.float32) / 255.0
    n, h, w, _ = x.shape
    hp = jax.lax.Precision.HIGHEST
    if h != SIZE:
        x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(resize_matrix(h)), x, precision=hp)
    if w != SIZE:
        x = jnp.einsum("pw,nowc->nopc", jnp.asarray(resize_matrix(w)), x, precision=hp)
    return 2.0 * x - 1.0


# ------------------------------------------------------------------------------------------ the layers


# Activations are NHWC by default; layout="NCHW" (a benchmark variant) keeps channels on axis 1 throughout.
_C = {"NHWC": -1, "NCHW": 1}


def _conv(x, p, spec: Conv, dtype, precision, layout: str = "NHWC"):
    """Convolution + folded-BN bias (no activation)."""
    _, _, _, (kh, kw), stride, padded = spec
    pad = [(kh // 2, kh // 2), (kw // 2, kw // 2)] if padded else [(0, 0), (0, 0)]
    y = jax.lax.conv_general_dilated(x, p["kernel"].astype(dtype), (stride, stride), pad,
                                     dimension_numbers=(layout, "HWIO", layout), precision=precision)
    b = p["bias"].astype(dtype)
    return y + (b if layout == "NHWC" else b[:, None, None])


def _shifted(x, axis: int, stride: int, out: int):
    """The three taps of a 3-wide window along `axis`: x[o*stride + i] for i = 0, 1, 2, each (.., out, ..)."""
    return [jax.lax.slice_in_dim(x, i, i + stride * (out - 1) + 1, stride, axis) for i in range(3)]


def _max_pool(x, stride: int, same: bool, layout: str = "NHWC"):
    """3x3 max pool, padding 1 (`same`) or none. Written as maxima of strided slices, rows then columns: on
    XLA:CPU 2-4x faster than reduce_window (e.g. 8 vs 30 ms for (16, 147, 147, 64)), same values."""
    h_ax, w_ax = (1, 2) if layout == "NHWC" else (2, 3)
    if same:
        pad = [(0, 0)] * 4
        pad[h_ax] = pad[w_ax] = (1, 1)
        x = jnp.pad(x, pad, constant_values=-jnp.inf)
    for ax in (h_ax, w_ax):
        a, b, c = _shifted(x, ax, stride, (x.shape[ax] - 3) // stride + 1)
        x = jnp.maximum(jnp.maximum(a, b), c)
    return x


def _avg_pool_excl(x, layout: str = "NHWC"):
    """3x3 stride-1 average, zero padding of 1 not counted (TF's SAME average pool). Summed rows then
    columns from slices (2x faster than reduce_window on XLA:CPU; sums in another order, ~1 ulp)."""
    h_ax, w_ax = (1, 2) if layout == "NHWC" else (2, 3)
    pad = [(0, 0)] * 4
    pad[h_ax] = pad[w_ax] = (1, 1)
    s = jnp.pad(x, pad)
    for ax in (h_ax, w_ax):
        a, b, c = _shifted(s, ax, 1, s.shape[ax] - 2)
        s = a + b + c
    h, w = x.shape[1:3] if layout == "NHWC" else x.shape[2:4]
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    inv = (1.0 / np.outer(rows, cols)).astype(np.float32)
    inv = inv[None, :, :, None] if layout == "NHWC" else inv[None, None]
    return s * jnp.asarray(inv, x.dtype)


FUSED = "fused_heads"  # a block's entry added by `with_fused_heads`: its 1x1 head kernels concatenated


def fused_heads(block_params: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """{"kernel": (1, 1, in, sum of outs), "bias": (sum,)}: the block's HEADS 1x1 convolutions as one."""
    heads = HEADS[kind]
    return {"kernel": jnp.concatenate([block_params[h]["kernel"] for h in heads], axis=-1),
            "bias": jnp.concatenate([block_params[h]["bias"] for h in heads], axis=-1)}


def with_fused_heads(params: Dict[str, Any]) -> Dict[str, Any]:
    """The parameter tree plus each block's fused head kernel (FUSED), computed once instead of in every call
    of `inception_forward(fuse=True)` (~20 ms of copies per batch on the CPU). The extra entries are ignored
    with fuse=False and are not part of InceptionV3's own tree."""
    out = dict(params)
    for name, kind, _ in BLOCKS:
        if len(HEADS[kind]) > 1:
            out[name] = {**params[name], FUSED: fused_heads(params[name], kind)}
    return out


def _block(x, params, kind: str, convs: List[Conv], dtype, precision, fuse: bool, taps: Dict[str, Any],
           name: str, layout: str = "NHWC"):
    spec = {c[0]: c for c in convs}
    relu = jax.nn.relu
    ch = _C[layout]

    def conv(name_, h):
        return relu(_conv(h, params[name_], spec[name_], dtype, precision, layout))

    pool_kind = {"A": "avg", "C": "avg", "E_avg": "avg", "E_max": "max", "B": None, "D": None}[kind]
    heads = HEADS[kind]
    if fuse and len(heads) > 1:  # one convolution for every 1x1 that reads x; pool after the pool branch's 1x1
        fused = params[FUSED] if FUSED in params else fused_heads(params, kind)
        y = _conv(x, fused, ("fused", 0, 0, (1, 1), 1, False), dtype, precision, layout)
        sizes = [spec[h][2] for h in heads]
        parts = jnp.split(y, np.cumsum(sizes)[:-1], axis=ch)
        first = {}
        for h, part in zip(heads, parts):
            pooled = h == "branch_pool" and pool_kind == "avg"
            first[h] = relu(_avg_pool_excl(part, layout)) if pooled else relu(part)
    else:
        first = {}
        for h in heads:
            if h == "branch_pool" and pool_kind == "avg":
                first[h] = conv(h, _avg_pool_excl(x, layout))
            else:
                first[h] = conv(h, x)
    if kind == "A":
        b5 = conv("branch5x5_2", first["branch5x5_1"])
        b3 = conv("branch3x3dbl_3", conv("branch3x3dbl_2", first["branch3x3dbl_1"]))
        outs = [first["branch1x1"], b5, b3, first["branch_pool"]]
    elif kind == "B":
        b3 = conv("branch3x3", x)
        bd = conv("branch3x3dbl_3", conv("branch3x3dbl_2", first["branch3x3dbl_1"]))
        outs = [b3, bd, _max_pool(x, 2, False, layout)]
    elif kind == "C":
        b7 = conv("branch7x7_3", conv("branch7x7_2", first["branch7x7_1"]))
        bd = first["branch7x7dbl_1"]
        for i in range(2, 6):
            bd = conv(f"branch7x7dbl_{i}", bd)
        outs = [first["branch1x1"], b7, bd, first["branch_pool"]]
    elif kind == "D":
        b3 = conv("branch3x3_2", first["branch3x3_1"])
        b7 = first["branch7x7x3_1"]
        for i in range(2, 5):
            b7 = conv(f"branch7x7x3_{i}", b7)
        outs = [b3, b7, _max_pool(x, 2, False, layout)]
    else:  # E
        t = first["branch3x3_1"]
        b3 = [conv("branch3x3_2a", t), conv("branch3x3_2b", t)]
        d = conv("branch3x3dbl_2", first["branch3x3dbl_1"])
        bd = [conv("branch3x3dbl_3a", d), conv("branch3x3dbl_3b", d)]
        bp = first["branch_pool"] if pool_kind == "avg" else conv("branch_pool", _max_pool(x, 1, True, layout))
        outs = [first["branch1x1"], *b3, *bd, bp]
    if name == SPATIAL_BLOCK:
        taps["spatial"] = first[SPATIAL_CONV]
    return jnp.concatenate(outs, axis=ch)


def inception_forward(params: Dict[str, Any], images: jax.Array, dtype: Any = jnp.float32, fuse: bool = True,
                      precision: Any = None, layout: str = "NHWC") -> Dict[str, jax.Array]:
    """The network as a pure function of the parameter tree (see the module docstring for the outputs)."""
    if precision is None:  # float32 convolutions must not silently run in TF32 on GPUs
        precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    x = preprocess(images).astype(dtype)  # (N, 299, 299, 3)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    stem = {c[0]: c for c in STEM}
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = jax.nn.relu(_conv(x, params[name], stem[name], dtype, precision, layout))  # 149, 147, 147
    x = _max_pool(x, 2, False, layout)  # (N, 73, 73, 64)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
        x = jax.nn.relu(_conv(x, params[name], stem[name], dtype, precision, layout))  # 73, 71
    x = _max_pool(x, 2, False, layout)  # (N, 35, 35, 192)
    taps: Dict[str, Any] = {}
    for name, kind, convs in BLOCKS:
        x = _block(x, params[name], kind, convs, dtype, precision, fuse, taps, name, layout)
    if layout == "NCHW":
        x, taps["spatial"] = x.transpose(0, 2, 3, 1), taps["spatial"].transpose(0, 2, 3, 1)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (N, 2048)
    spatial = taps["spatial"][..., :SPATIAL_CHANNELS].astype(jnp.float32)  # (N, 17, 17, 7)
    hp = jax.lax.Precision.HIGHEST
    unbiased = jnp.dot(pool, params["fc"]["kernel"].astype(jnp.float32), precision=hp)
    return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": unbiased + params["fc"]["bias"].astype(jnp.float32), "logits_unbiased": unbiased}


def _init_tree(prefix: str):
    """Initializer of one top-level entry ("Mixed_5b" or "fc"): He-normal kernels, zero biases."""
    shapes = {k[len(prefix) + 1:]: s for k, s in param_shapes().items() if k.startswith(prefix + "/")}

    def init(key):
        tree: Dict[str, Any] = {}
        for i, (k, s) in enumerate(sorted(shapes.items())):
            *path, leaf = k.split("/")
            node = tree
            for p in path:
                node = node.setdefault(p, {})
            if leaf == "kernel":
                fan_in = int(np.prod(s[:-1]))
                node[leaf] = jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * np.sqrt(2.0 / fan_in)
            else:
                node[leaf] = jnp.zeros(s, jnp.float32)
        return tree

    return init


TOP_LEVEL = tuple(c[0] for c in STEM) + tuple(b[0] for b in BLOCKS) + ("fc",)


def init_params(seed: int = 0) -> Dict[str, Any]:
    """Random float32 NumPy parameters (the tree InceptionV3().init builds: He-normal kernels, zero biases),
    drawn with NumPy without running or compiling anything (tests and benchmarks)."""
    g = np.random.default_rng(seed)
    tree: Dict[str, Any] = {}
    for k, s in param_shapes().items():
        *path, leaf = k.split("/")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        std = np.sqrt(2.0 / int(np.prod(s[:-1]))) if leaf == "kernel" else 0.0
        node[leaf] = (g.standard_normal(s, np.float32) * std).astype(np.float32)
    return tree


class InceptionV3(nn.Module):
    """Flax wrapper of `inception_forward`; parameters are float32, `dtype` is the compute dtype."""
    dtype: Any = jnp.float32
    fuse: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> Dict[str, jax.Array]:
        params = {name: self.param(name, _init_tree(name)) for name in TOP_LEVEL}
        return inception_forward(params, images, self.dtype, self.fuse)
