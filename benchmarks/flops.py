"""Parameters and forward multiply-adds of all 12 DiT sizes, next to the DiT paper's Table 4.

    python -m benchmarks.flops                 # all 12 sizes at 256 px plus XL/2 at 512 px
    python -m benchmarks.flops --models DiT-S/2 --tiny   # quick smoke run (CI)

Two counts from the lowered XLA program (no weights are allocated: shapes only):
- "macs": multiply-adds of every dot_general (patch embedding, linears, attention QK^T and AV), read from the
  StableHLO text. The paper's "Gflops" are this quantity.
- "xla/2": XLA's cost analysis flops / 2, which also counts elementwise work (norms, softmax, GELU).
"""
from __future__ import annotations

import argparse
import math
import re
import sys

import jax
import jax.numpy as jnp

from dit_jax.model import DiT_models, count_params
from dit_jax.nn.model_ops import get_2d_sincos_pos_embed

# DiT paper, Table 4: Gflops (multiply-adds) per forward pass of one image; params in millions.
PAPER_GFLOPS = {
    ("DiT-S/8", 256): 0.36, ("DiT-S/4", 256): 1.41, ("DiT-S/2", 256): 6.06,
    ("DiT-B/8", 256): 1.42, ("DiT-B/4", 256): 5.56, ("DiT-B/2", 256): 23.01,
    ("DiT-L/8", 256): 5.01, ("DiT-L/4", 256): 19.70, ("DiT-L/2", 256): 80.71,
    ("DiT-XL/8", 256): 7.39, ("DiT-XL/4", 256): 29.05, ("DiT-XL/2", 256): 118.64,
    ("DiT-XL/2", 512): 524.60,
}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}

_DOT = re.compile(r"stablehlo\.dot_general %\S+, %\S+,.*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\].*?"
                  r":\s*\(tensor<([\dx]+)x\w+>, tensor<[\dx]+x\w+>\) -> tensor<([\dx]+)x\w+>")


def dot_macs(stablehlo_text: str) -> int:
    """Sum over dot_general ops of prod(output shape) * prod(lhs contracting dims)."""
    total = 0
    for line in stablehlo_text.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        contract = [int(c) for c in m.group(1).split(",") if c.strip()]
        lhs = [int(d) for d in m.group(2).split("x")]
        out = [int(d) for d in m.group(3).split("x")]
        total += math.prod(out) * math.prod(lhs[c] for c in contract)
    return total


def measure(name: str, image_size: int, depth=None, num_classes: int = 1000):
    """(params incl. pos_embed, dot MACs, XLA flops / 2) for one forward of one image."""
    kw = {} if depth is None else {"depth": depth}
    return measure_model(DiT_models[name](input_size=image_size // 8, num_classes=num_classes, **kw))


def measure_model(model):
    """measure() for any DiT module."""
    # Unrolled blocks: a scanned loop body appears once in the program text and would be counted once.
    model = model.clone(scan_blocks=False)
    s, c = model.input_size, model.in_channels
    x = jax.ShapeDtypeStruct((1, s, s, c), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t)
    pos = get_2d_sincos_pos_embed(model.hidden_size, s // model.patch_size).size
    lowered = jax.jit(lambda v, x, t, y: model.apply(v, x, t, y)).lower(variables, x, t, t)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_macs = cost["flops"] / 2 if cost and "flops" in cost else float("nan")  # some backends give no analysis
    return count_params(variables["params"]) + pos, dot_macs(lowered.as_text()), xla_macs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="subset of names (default: all 12 + XL/2 512)")
    ap.add_argument("--tiny", action="store_true", help="depth 2 (smoke test; no paper comparison)")
    args = ap.parse_args(argv)
    rows = [(n, s) for (n, s) in PAPER_GFLOPS if args.models is None or n in args.models]
    print(f"{'model':10s} {'px':>4s} {'params':>13s} {'paper M':>7s} {'GMACs':>8s} {'paper':>7s} {'diff':>7s} "
          f"{'xla/2':>8s}")
    worst = 0.0
    for name, size in rows:
        params, macs, xla = measure(name, size, depth=2 if args.tiny else None)
        g = macs / 1e9
        paper = PAPER_GFLOPS[(name, size)]
        size_key = name.split("-")[1].split("/")[0]
        diff = (g - paper) / paper
        if not args.tiny:
            worst = max(worst, abs(diff))
        print(f"{name:10s} {size:4d} {params:13,d} {PAPER_PARAMS_M[size_key]:7d} {g:8.2f} {paper:7.2f} "
              f"{100 * diff:+6.2f}% {xla / 1e9:8.2f}")
    if not args.tiny:
        print(f"largest |relative difference| of multiply-adds vs Table 4: {100 * worst:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
