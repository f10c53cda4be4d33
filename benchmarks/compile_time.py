"""Compile time of the DiT forward and training step, from abstract shapes (no weights, nothing runs).

    python -m benchmarks.compile_time                      # DiT-XL/2, 256 px, batch 2, on this machine's backend
    python -m benchmarks.compile_time --model DiT-S/2 --unrolled   # also the unrolled training step
    python -m benchmarks.compile_time --tiny               # smoke run (CI)

The training step is dit-jax-train's (benchmarks/product_step.py: diffusion loss, backward, AdamW, EMA). In training the blocks run
as one `lax.scan`, so the step's compile time does not grow with depth; `--unrolled` compiles the Python
loop over blocks for comparison (slow to compile for deep models, and O(depth^2) to run on CPU).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.product_step import ProductStep, bench_config
from dit_jax.model import get_model, init_params


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--unrolled", action="store_true", help="also compile the training step with unrolled blocks")
    ap.add_argument("--tiny", action="store_true", help="DiT-S/2, depth 2, 64 px")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.depth, args.image_size = "DiT-S/2", 2, 64
    return args


def compile_seconds(fn, *abstract_args) -> float:
    t0 = time.perf_counter()
    fn.lower(*abstract_args).compile()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse(argv)
    latent = args.image_size // 8
    kw = {} if args.depth is None else {"depth": args.depth}
    model = get_model(args.model, input_size=latent, dtype=jnp.dtype(args.dtype), **kw)
    x = jax.ShapeDtypeStruct((args.batch, latent, latent, model.in_channels), jnp.float32)  # (N, H, W, C)
    t = y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), args.batch))
    res = {"model": args.model, "latent": latent, "batch": args.batch, "dtype": args.dtype,
           "depth": model.depth, "backend": jax.default_backend()}
    fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))  # the samplers' forward (scanned)
    res["forward_s"] = compile_seconds(fwd, params, x, t, y)
    cfg = bench_config(args.model, args.image_size, args.batch, depth=args.depth, dtype=args.dtype)
    variants = [("train_step_s", None)] + ([("train_step_unrolled_s", lambda m: m.clone(scan_blocks=False))]
                                           if args.unrolled else [])
    for key, transform in variants:
        step = ProductStep(cfg, model_transform=transform)  # dit-jax-train's step, abstract state and batch
        t0 = time.perf_counter()
        step.compile()
        res[key] = time.perf_counter() - t0
    print(f"{args.model} depth {model.depth} latent {latent} batch {args.batch} {args.dtype} on {res['backend']}: "
          + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in res.items() if k.endswith("_s")))
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
