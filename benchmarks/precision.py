"""float32 error of dit_jax and of the release, both measured against the release's program in float64.

    python -m benchmarks.precision                          # all 12 sizes, 256 px (latent 32), 2 blocks
    python -m benchmarks.precision --latent 64              # 512 px
    python -m benchmarks.precision --models DiT-L/2 --t all # every t in [0, 999] (batches of 50)
    python -m benchmarks.precision --t 0 3 5 10 977 999 --markdown   # one row per size

Weights: the release model (convert/reference torch DiT) with every trained parameter drawn from N(0, 0.05),
depth 2, converted to Flax. Error = max|out - out64| / max|out64| per example (one t per example, the same
latent x and label for all).

The reference (`forward64`) is the release's program evaluated in float64: its explicit float32 casts are
kept, everything else is float64. Those casts are the timestep features' float32 frequencies (PyTorch's
values, dit_jax.nn.timestep_frequencies) and float32 arguments `t.float() * freq`, and the position table
(computed in float64, stored as float32: the state_dict's pos_embed). Every checkpoint learned on those
rounded values, so they are the model; cos/sin of the float32 arguments, the weights, LayerNorm, softmax and
tanh-GELU are float64. `--all-float64` adds the errors against the DiT maths with float64 frequencies and
arguments too (the reference of issue 13's first tables), which charges the release's own definition to
both float32 programs at large t.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from dit_jax.nn.timestep_frequencies import timestep_frequencies

DEFAULT_T = (0, 1, 3, 5, 10, 50, 100, 250, 500, 750, 900, 977, 990, 999)


# ----------------------------------------------------------------------------------------------------
# float64 NumPy DiT from a release state_dict (NCHW in and out)
# ----------------------------------------------------------------------------------------------------
def _linear(sd, key, x):
    return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _gelu_tanh(x):
    # x * x * x, not x**3: NumPy's float64 power is ~40x slower (the cube differs by an ulp, 1e-16)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def _pos_table64(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim): first half sin/cos of the column (w) coordinate, second half of the row (h)."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one(pos):
        a = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([one(cols), one(rows)], axis=1)


def timestep_features64(t: np.ndarray, dim: int = 256) -> np.ndarray:
    """(N,) -> (N, dim) the release's `cat([cos, sin])` in float64 with its float32 casts kept: float32
    frequencies (the release's values) and one float32 product per argument, cos/sin in float64."""
    args = np.asarray(t, np.float32)[:, None] * timestep_frequencies(dim)[None]  # (N, dim/2) float32
    return np.concatenate([np.cos(args.astype(np.float64)), np.sin(args.astype(np.float64))], axis=1)


def timestep_features_all64(t: np.ndarray, dim: int = 256) -> np.ndarray:
    """(N,) -> (N, dim) `cat([cos, sin])` with float64 frequencies and arguments: not the release's program."""
    half = dim // 2
    args = np.asarray(t, np.float64)[:, None] * np.exp(-math.log(10000.0) * np.arange(half) / half)[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=1)


def timestep_features_release32(t: np.ndarray, dim: int = 256) -> np.ndarray:
    """The release's float32 features (torch float32 ops), as float64."""
    import torch

    from convert.reference.torch_dit import TimestepEmbedder

    return TimestepEmbedder.timestep_embedding(torch.as_tensor(np.asarray(t, np.float32)), dim).double().numpy()


def forward64(sd: Dict[str, np.ndarray], cfg: dict, x: np.ndarray, t: np.ndarray, y: np.ndarray,
              release_casts: bool = True) -> np.ndarray:
    """The release's program in float64 (module docstring): x (N, C, H, W), t (N,), y (N,) -> (N, out_C, H, W).
    `sd`: release keys, float64 (pos_embed holds the release's float32 table). release_casts=False: float64
    timestep frequencies, arguments and position table instead (the `--all-float64` reference).

    One example at a time: a batch's float64 attention maps are GBs at 512 px (N x 16 x 1024 x 1024 x 8 bytes),
    and allocating them cost more than the arithmetic (XL/2, 5 examples: 9 instead of 15 CPU seconds)."""
    return np.concatenate([_forward64_batch(sd, cfg, x[i:i + 1], t[i:i + 1], y[i:i + 1], release_casts)
                           for i in range(len(x))])


def _forward64_batch(sd, cfg, x, t, y, release_casts):
    n, c_in, hh, _ = x.shape
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    g = hh // p
    patches = x.reshape(n, c_in, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c_in * p * p)
    w = sd["x_embedder.proj.weight"].reshape(d, -1)  # (D, C*p*q), conv weight flattened like the patches
    pos = sd["pos_embed"].reshape(1, g * g, d) if release_casts else _pos_table64(d, g)[None]  # (1, T, D)
    h = patches @ w.T + sd["x_embedder.proj.bias"] + pos  # (N, T, D)
    tf = timestep_features64(t) if release_casts else timestep_features_all64(t)  # (N, 256)
    c = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", tf)))
    c = c + sd["y_embedder.embedding_table.weight"][y]  # (N, D)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        mod = _linear(sd, b + "adaLN_modulation.1", _silu(c))[:, None, :]  # (N, 1, 6D)
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = np.split(mod, 6, axis=-1)
        a = _layer_norm(h) * (1 + sc_msa) + s_msa
        qkv = _linear(sd, b + "attn.qkv", a).reshape(n, g * g, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        logits = qkv[0] @ qkv[1].swapaxes(-1, -2) / math.sqrt(d // heads)  # (N, H, T, T)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        a = (probs @ qkv[2]).transpose(0, 2, 1, 3).reshape(n, g * g, d)
        h = h + g_msa * _linear(sd, b + "attn.proj", a)
        m = _layer_norm(h) * (1 + sc_mlp) + s_mlp
        h = h + g_mlp * _linear(sd, b + "mlp.fc2", _gelu_tanh(_linear(sd, b + "mlp.fc1", m)))
    shift, scale = np.split(_linear(sd, "final_layer.adaLN_modulation.1", _silu(c))[:, None, :], 2, axis=-1)
    out = _linear(sd, "final_layer.linear", _layer_norm(h) * (1 + scale) + shift)  # (N, T, p*q*C_out)
    c_out = out.shape[-1] // (p * p)
    return out.reshape(n, g, g, p, p, c_out).transpose(0, 5, 1, 3, 2, 4).reshape(n, c_out, hh, hh)


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------
def release_model(name: str, latent: int, depth: Optional[int] = 2, std: float = 0.05, seed: int = 0):
    """The release DiT with every trained parameter from N(0, std) (adaLN and output layer included);
    depth None: the size's own."""
    import torch

    from convert.reference.torch_dit import DiT_models

    torch.manual_seed(seed)
    model = DiT_models[name](input_size=latent, **({} if depth is None else {"depth": depth})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key != "pos_embed":
                p.normal_(0.0, std)
    return model


def rel_err_per_example(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    n = ref.shape[0]
    return np.abs(out - ref).reshape(n, -1).max(1) / np.abs(ref).reshape(n, -1).max(1)


def measure(name: str, latent: int, ts: Sequence[int], depth: int = 2, batch: int = 50, seed: int = 0,
            all64_reference: bool = False, variants: Dict[str, dict] = None) -> Dict[str, np.ndarray]:
    """Per-t errors for one size: {"t", "release", one entry per dit_jax variant (name -> DiT overrides,
    default {"jax": {}}; the override "xla_defaults": True compiles with XLA's default options instead of
    dit_jax's)[, the same against the all-float64 reference with suffix "_all64"]}. `batch` caps the examples per call (memory)."""
    import jax
    import torch

    import convert
    from dit_jax.model import DiT

    from dit_jax.utils import xla_cpu

    variants = {"jax": {}} if variants is None else variants
    tm = release_model(name, latent, depth=depth, seed=seed)
    params, cfg = convert.torch_to_flax(tm.state_dict())
    fwds = {}
    for v, overrides in variants.items():
        overrides = dict(overrides)
        # dit_jax's own programs are compiled with xla_cpu.compiler_options(); "xla_defaults" is a user's
        # plain jax.jit (on jaxlib >= 0.9 XLA:CPU's YNNPACK dots)
        options = None if overrides.pop("xla_defaults", False) else xla_cpu.compiler_options()
        jm = DiT(**{**cfg, **overrides})
        fwds[v] = jax.jit(lambda p, x, t, y, jm=jm: jm.apply({"params": p}, x, t, y), compiler_options=options)
    sd64 = {k: v.double().numpy() for k, v in tm.state_dict().items()}
    x1 = np.random.RandomState(seed + 1).randn(1, 4, latent, latent).astype(np.float32)  # (1, C, H, W)
    ts = np.asarray(ts)
    refs = {"": True, "_all64": False} if all64_reference else {"": True}  # suffix -> release_casts
    res = {k + suffix: [] for k in ["release", *variants] for suffix in refs}
    for start in range(0, len(ts), batch):
        tb = ts[start:start + batch]
        x, y = np.repeat(x1, len(tb), 0), np.full((len(tb),), 7)
        t32 = tb.astype(np.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the release's numbers then do not depend on the cores (tests = the table)
        try:
            with torch.no_grad():
                outs = {"release": tm(torch.from_numpy(x), torch.from_numpy(t32), torch.from_numpy(y)).double().numpy()}
        finally:
            torch.set_num_threads(threads)
        for v, fwd in fwds.items():  # NHWC -> NCHW
            outs[v] = np.asarray(fwd(params, x.transpose(0, 2, 3, 1), t32, y), np.float64).transpose(0, 3, 1, 2)
        for suffix, release_casts in refs.items():
            ref = forward64(sd64, cfg, x.astype(np.float64), tb, y, release_casts)
            for k, out in outs.items():
                res[k + suffix].append(rel_err_per_example(out, ref))
    return {"t": ts, **{k: np.concatenate(v) for k, v in res.items()}}


def parse(argv=None):
    from convert.reference.torch_dit import DiT_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=sorted(DiT_models), help="sizes (default: all 12)")
    ap.add_argument("--latent", type=int, default=32, help="latent size: 32 = 256 px, 64 = 512 px")
    ap.add_argument("--t", nargs="+", default=[str(t) for t in DEFAULT_T], help="timesteps, or 'all' for 0..999")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--all-float64", action="store_true",
                    help="also the errors against the DiT maths with float64 timestep frequencies, arguments "
                         "and position table (not the release's program)")
    ap.add_argument("--markdown", action="store_true", help="finish with a markdown table (sizes x t)")
    ap.add_argument("--precise-both", action="store_true",
                    help="also precise_cpu_dots=True compiled as dit_jax compiles it (column precise_dit)")
    args = ap.parse_args(argv)
    args.t = list(range(1000)) if args.t == ["all"] else [int(t) for t in args.t]
    return args


# dit_jax: DiT as dit_jax's programs compile it (dit_jax.utils.xla_cpu: XLA:CPU's Eigen dots);
# ynn: the same model under a user's plain jax.jit (XLA's default YNNPACK dots on jaxlib >= 0.9);
# precise: DiT(precise_cpu_dots=True) under a plain jax.jit.
VARIANTS = {"jax": {}, "ynn": {"xla_defaults": True}, "precise": {"precise_cpu_dots": True, "xla_defaults": True}}
# --precise-both: also DiT(precise_cpu_dots=True) as dit_jax compiles it
PRECISE_DIT = {"precise_dit": {"precise_cpu_dots": True}}


def _size_order(name: str):
    """DiT-S/8 ... DiT-XL/2: by width, then by tokens."""
    size, patch = name[4:].split("/")
    return ["S", "B", "L", "XL"].index(size), -int(patch)


def main(argv=None) -> Dict[str, Dict[str, np.ndarray]]:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = {}
    print(f"max|out - out64| / max|out64| against the release's program in float64 NumPy; latent {args.latent} ({args.latent * 8} px), "
          f"depth {args.depth}, weights N(0, 0.05), one example per t.\n"
          f"dit_jax: DiT as dit_jax compiles it; ynn: under a plain jax.jit (XLA's YNNPACK dots); precise: "
          f"DiT(precise_cpu_dots=True) under a plain jax.jit. ratio = variant / release (goal <= 1.5)")
    variants = {**VARIANTS, **(PRECISE_DIT if args.precise_both else {})}
    names = list(variants)
    for name in sorted(args.models, key=_size_order):
        r = measure(name, args.latent, args.t, depth=args.depth, all64_reference=args.all_float64, variants=variants)
        out[name] = r
        ratios = {v: r[v] / r["release"] for v in names}
        print(f"{name:9s} worst over t: release {r['release'].max():.2e}  " +
              "  ".join(f"{v} {r[v].max():.2e}" for v in names) + " | max ratio " +
              ", ".join(f"{v} {ratios[v].max():.2f} (t={r['t'][ratios[v].argmax()]})" for v in names))
        if len(args.t) <= 20:
            for i, t in enumerate(r["t"]):
                line = f"    t={t:3d}  release {r['release'][i]:.2e}  " + "  ".join(
                    f"{v} {r[v][i]:.2e} ({ratios[v][i]:.2f}x)" for v in names)
                if args.all_float64:
                    line += "  | all-float64 ref: release {:.2e} ".format(r["release_all64"][i]) + " ".join(
                        f"{v} {r[v + '_all64'][i]:.2e}" for v in names)
                print(line)
    if args.markdown:
        print(f"\n{args.latent * 8} px: release / " + " / ".join(names) + "\n")
        print("| size | " + " | ".join(f"t={t}" for t in args.t) + " |\n|---|" + "---|" * len(args.t))
        for name, r in out.items():
            print(f"| {name} | " + " | ".join(" / ".join(f"{r[k][i]:.2e}" for k in ["release", *names])
                                               for i in range(len(args.t))) + " |")
    return out


if __name__ == "__main__":
    main()
