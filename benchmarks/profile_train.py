"""Where does the JAX training step spend its time?  Ablations and a per-op profile, one process.

    python -m benchmarks.profile_train                          # DiT-S/2, latent 32, batch 8, all variants
    python -m benchmarks.profile_train --variants base custom_ln_gelu attn_remat remat --repeats 3
    python -m benchmarks.profile_train --trace --variants base  # top XLA ops of one step (jax.profiler)

Each variant is the product's training step (dit-jax-train's, benchmarks/product_step.py) built with some part
of the model swapped at trace time. Variants run interleaved, `--repeats` rounds, and both the wall time and the process
CPU time of each call are reported (median): on a shared machine the CPU time is the steadier number.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

import dit_jax.model as dit_model
from benchmarks.common import make_pair
from benchmarks.product_step import ProductStep, bench_config
from dit_jax.utils import cpu_malloc


# ----------------------------------------------------------------------------------------------------
# Variants: context managers active while the step is traced
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _einsum_attention(q, k, v, *args, **kwargs):
    """Plain einsum + softmax attention, (N, T, H, Dh) in and out."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("nthd,nshd->nhts", q * scale, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("nhts,nshd->nthd", probs, v)


# Hand-written backward passes for LayerNorm and tanh-GELU (variant "custom_ln_gelu"): same forward maths,
# the backward is a few elementwise passes over saved (y, 1/std) and (x, tanh). Gradients match autodiff to
# ~2e-7 (relative); gain measured in docs/performance.md (6-8% in direct A/B runs, not adopted).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ln_vjp(x, eps):
    return _ln_fwd(x, eps)[0]


def _ln_fwd(x, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)  # (..., 1)
    y = xc * rstd
    return y, (y, rstd)


def _ln_bwd(eps, res, g):
    y, rstd = res  # dx = rstd * (g - mean(g) - y * mean(g * y))
    return (rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


_ln_vjp.defvjp(_ln_fwd, _ln_bwd)


def _custom_layer_norm(x, eps=1e-6):
    return _ln_vjp(x.astype(jnp.float32), eps)


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def _gelu_vjp(x):
    return _gelu_fwd(x)[0]


def _gelu_fwd(x):
    t = jnp.tanh(_GELU_C * (x + 0.044715 * (x**3)))
    return x * (0.5 * (1.0 + t)), (x, t)


def _gelu_bwd(res, g):
    x, t = res
    return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_GELU_C * (1.0 + 3 * 0.044715 * x * x))),)


_gelu_vjp.defvjp(_gelu_fwd, _gelu_bwd)


def _custom_gelu(x, approximate=True):
    assert approximate, "the model uses the tanh approximation"
    return _gelu_vjp(x)


def variant(name: str, model):
    """(model to use, context manager to trace under) for one variant."""
    if name == "base":
        return model, contextlib.nullcontext()
    if name == "unrolled":  # the blocks as a Python loop (the release's structure) instead of one lax.scan
        return model.clone(scan_blocks=False), contextlib.nullcontext()
    if name == "einsum_attn":  # through jax.nn.dot_product_attention ("xla"), patched
        return model.clone(attention_impl="xla"), _patched(jax.nn, "dot_product_attention", _einsum_attention)
    if name == "attn_remat":  # recompute logits/probs in the backward instead of stacking them per block
        return (model.clone(attention_impl="xla"),
                _patched(jax.nn, "dot_product_attention", jax.checkpoint(_einsum_attention)))
    if name == "remat":
        return model.clone(remat=True), contextlib.nullcontext()
    if name == "custom_ln_gelu":  # LayerNorm and GELU with hand-written backward passes (custom_vjp)
        stack = contextlib.ExitStack()
        stack.enter_context(_patched(dit_model, "layer_norm", _custom_layer_norm))
        stack.enter_context(_patched(nn, "gelu", _custom_gelu))
        return model, stack
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


VARIANTS = ("base", "unrolled", "einsum_attn", "attn_remat", "remat", "custom_ln_gelu")


# ----------------------------------------------------------------------------------------------------
def build_steps(args):
    """name -> zero-argument call running one step of that variant of the product's training step
    (benchmarks/product_step.py), all from the same weights (benchmarks.common.make_pair)."""
    latent = args.image_size // 8
    _, params, _, _ = make_pair(args.model, latent, depth=args.depth)
    cfg = bench_config(args.model, args.image_size, args.batch, depth=args.depth)
    calls = {}
    for name in args.variants:
        ctx_box = []
        step = ProductStep(cfg, model_transform=lambda m, name=name: _keep_ctx(variant(name, m), ctx_box))
        with ctx_box[0]:  # trace and compile now, under the patch
            compiled = step.compile()
        step.init_state(params)

        def call(step=step):
            return step()

        call.hlo = compiled.as_text()
        calls[name] = call
    return calls


def _keep_ctx(model_and_ctx, box):
    model, ctx = model_and_ctx
    box.append(ctx)
    return model


def op_sources(hlo_text: str) -> dict:
    """XLA instruction name -> (shape, the JAX op_name in its metadata), from compiled HLO text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        out.setdefault(m.group(1), (m.group(2), m.group(3)))
    return out


def time_interleaved(calls, repeats: int):
    wall, cpu = defaultdict(list), defaultdict(list)
    for f in calls.values():  # warm-up
        jax.block_until_ready(f())
    for _ in range(repeats):
        for name, f in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def top_ops(call, n: int = 25):
    """Sum of profiler event durations per XLA op name over one step, largest first."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        jax.block_until_ready(call())
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))[-1]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    acc = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("$", "ThunkExecutor", "Slinky")):
            acc[e["name"]] += e.get("dur", 0) / 1e3
    return sorted(acc.items(), key=lambda kv: -kv[1])[:n]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trace", action="store_true", help="print the top ops of one step of each variant")
    args = ap.parse_args(argv)
    calls = build_steps(args)
    print(f"{args.model} depth {args.depth or 'full'} latent {args.image_size // 8} batch {args.batch}", flush=True)
    if args.trace:
        for name, call in calls.items():
            jax.block_until_ready(call())
            print(f"[{name}] top ops of one step (ms, summed over loop iterations):")
            sources = op_sources(call.hlo)
            for op, ms in top_ops(call):
                shape, src = sources.get(op, ("", ""))
                print(f"  {ms:9.1f}  {op:28s} {shape[:40]:40s} {src[-90:]}")
        return
    wall, cpu = time_interleaved(calls, args.repeats)
    for name in calls:
        w, c = wall[name], cpu[name]
        print(f"  {name:12s} step wall median {np.median(w):7.3f} s (min {min(w):.3f}, max {max(w):.3f})"
              f"  cpu median {np.median(c):7.3f} s (min {min(c):.3f})  -> {args.batch / np.median(w):.2f} img/s")


if __name__ == "__main__":
    # Before JAX starts; both frameworks share this process and its settings (not applied when imported).
    cpu_malloc.configure(verbose=True)
    main()
