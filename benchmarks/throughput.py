"""Forward and training-step throughput, JAX vs the project's PyTorch reference, same weights, one process.

    python -m benchmarks.throughput                       # CPU default: DiT-S/2, 256 px (latent 32), batch 8
    python -m benchmarks.throughput --model DiT-XL/2 --batch 32 --dtype bfloat16   # on a GPU
    python -m benchmarks.throughput --tiny                # smoke run (CI)
    python -m benchmarks.throughput --memory              # also peak memory of each side (separate processes)
    python -m benchmarks.throughput --unrolled            # JAX blocks unrolled (before the lax.scan fix)
    python -m benchmarks.throughput --precise-cpu-dots    # JAX with DiT(precise_cpu_dots=True)
    DIT_JAX_CPU_YNNPACK=1 python -m benchmarks.throughput # JAX compiled with XLA's defaults (YNNPACK), see
                                                          # dit_jax/utils/xla_cpu.py

The training step: PyTorch runs the release's (diffusion loss (MSE + VB, learned sigma), backward, AdamW, EMA
update); JAX runs the one `dit-jax-train` runs, built by the same code (configs/default.py -> train.setup ->
train.jit_train_step; benchmarks/product_step.py), which also samples the latent posterior and draws t and
the noise inside the step. The forward is the samplers' (the same scan, as guidance.dit_model_fn runs it).
JAX and PyTorch calls alternate (A B A B ...) so that load from other processes hits both alike; the median
wall time is reported, with its min-max and the median process CPU time per call.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import (batch_inputs, jax_sync, make_pair, make_torch_train_step, timed_interleaved,
                               torch_sync_fn)
from benchmarks.product_step import ProductStep, bench_config
from dit_jax.nn import attention
from dit_jax.analysis import mfu
from dit_jax.utils import cpu_malloc, xla_cpu


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=None, help="cut the depth (smoke runs)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS, help="JAX attention_impl")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="DiT-S/2, depth 2, latent 8, batch 2, 1 iteration")
    ap.add_argument("--unrolled", action="store_true",
                    help="JAX blocks as a Python loop (DiT(scan_blocks=False), the state before the scan fix)")
    ap.add_argument("--precise-cpu-dots", action="store_true",
                    help="JAX model with DiT(precise_cpu_dots=True): CPU dots summed over <= 128-long slices")
    ap.add_argument("--memory", action="store_true", help="measure peak memory of each side in a subprocess")
    ap.add_argument("--only", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON line with the results")
    args = ap.parse_args(argv)
    if args.tiny:
        args.depth, args.image_size, args.batch, args.iters, args.warmup = 2, 64, 2, 1, 1
    return args


def jax_callables(args, model, params, inputs):
    """(forward, train step) zero-argument callables for the JAX side. The step is the product's
    (dit-jax-train's, benchmarks/product_step.py) with the same weights, on one device."""
    def variant(m):
        if args.unrolled:
            m = m.clone(scan_blocks=False)
        if args.precise_cpu_dots:
            m = m.clone(precise_cpu_dots=True)
        return m

    cfg = bench_config(args.model, args.image_size, args.batch, depth=args.depth, dtype=args.dtype,
                       attention_impl=args.attention)
    step = ProductStep(cfg, model_transform=variant)
    step.compile()
    step.init_state(params)
    fwd_model = variant(step.model)  # the samplers' forward (guidance.dit_model_fn: the blocks' scan)
    x = jnp.asarray(inputs["x"].transpose(0, 2, 3, 1))  # (N, H, W, C)
    y, t = jnp.asarray(inputs["y"], jnp.int32), jnp.asarray(inputs["t"], jnp.int32)
    fwd = xla_cpu.jit(lambda p, x, t, y: fwd_model.apply({"params": p}, x, t, y))  # as dit_jax compiles it
    return (lambda: fwd(params, x, t, y)), step


def torch_callables(args, tmodel, inputs):
    """(forward, train step, sync) for the PyTorch reference."""
    import torch

    from convert.reference.torch_diffusion import TorchDiffusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    x = torch.from_numpy(inputs["x"]).to(device)
    noise = torch.from_numpy(inputs["noise"]).to(device)
    y, t = torch.from_numpy(inputs["y"]).to(device), torch.from_numpy(inputs["t"]).to(device)
    fwd_model = copy.deepcopy(tmodel).eval()  # the train step puts tmodel in train mode

    def fwd():
        with torch.no_grad(), torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            return fwd_model(x, t, y)

    step = make_torch_train_step(tmodel, TorchDiffusion(""), autocast_dtype=autocast)
    return fwd, (lambda: step(x, y, t, noise)), torch_sync_fn(device), device


def measure(args, model, params, tmodel, inputs) -> dict:
    """Forward, then training step; within each, the JAX and PyTorch calls alternate (see timed_interleaved)."""
    fns, syncs = {}, {}
    if args.only != "torch":
        fns["jax_forward"], fns["jax_train"] = jax_callables(args, model, params, inputs)
        syncs["jax_forward"] = syncs["jax_train"] = jax_sync
    device = None
    if args.only != "jax":
        fns["torch_forward"], fns["torch_train"], tsync, device = torch_callables(args, tmodel, inputs)
        syncs["torch_forward"] = syncs["torch_train"] = tsync
    out = {}
    for phase in ("forward", "train"):
        names = [n for n in fns if n.endswith(phase)]
        times = timed_interleaved({n: fns[n] for n in names}, syncs, args.warmup, args.iters)
        for n, r in times.items():
            out[f"{n}_ips"] = args.batch / r["s"]
            out[f"{n}_s"] = r["s"]
            out[f"{n}_cpu_s"] = r["cpu_s"]
            out[f"{n}_spread"] = (r["min_s"], r["max_s"])
    if args.only != "torch":
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["jax_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    if device == "cuda":
        import torch

        out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def peak_rss_subprocess(argv, which: str) -> float:
    """Peak resident memory (GiB) of a child process that runs only one framework's benchmark."""
    code = ("import resource, sys, runpy; sys.argv = sys.argv[1:]; "
            "from dit_jax.utils import cpu_malloc; cpu_malloc.configure(); "
            "from benchmarks import throughput; throughput.main(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, "x", *argv, "--only", which], capture_output=True, text=True,
                         check=True, env={**os.environ})
    kib = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("MAXRSS")][0]
    return kib / 2**20


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    latent = args.image_size // 8
    model, params, cfg, tmodel = make_pair(args.model, latent, depth=args.depth)
    inputs = batch_inputs(args.batch, latent, cfg["num_classes"])
    res = {"model": args.model, "latent": latent, "batch": args.batch, "dtype": args.dtype,
           "device": str(jax.devices()[0].platform)}
    res.update(measure(args, model, params, tmodel, inputs))
    if "jax_train_ips" in res:
        m = mfu.tflops_and_mfu(res["jax_train_ips"], mfu.train_flops_per_example(model), 1,
                               jax.devices()[0].device_kind)
        res.update({f"jax_train_{k}": v for k, v in m.items()})
    if args.only is None:
        res["forward_ratio"] = res["jax_forward_ips"] / res["torch_forward_ips"]
        res["train_ratio"] = res["jax_train_ips"] / res["torch_train_ips"]
        if args.memory and res["device"] == "cpu":
            clean = [a for a in argv if a != "--memory"]
            res["jax_peak_rss_gib"] = peak_rss_subprocess(clean, "jax")
            res["torch_peak_rss_gib"] = peak_rss_subprocess(clean, "torch")
        print(f"{args.model} latent {latent} batch {args.batch} {args.dtype} on {res['device']}")
        for phase in ("forward", "train"):
            j, t = f"jax_{phase}", f"torch_{phase}"
            print(f"  {phase:8s} images/s: JAX {res[j + '_ips']:8.2f}  PyTorch {res[t + '_ips']:8.2f}"
                  f"  ratio {res[phase + '_ratio']:.2f}x   (median of {args.iters}, wall s/step min-max JAX"
                  f" {res[j + '_spread'][0]:.2f}-{res[j + '_spread'][1]:.2f}, PyTorch {res[t + '_spread'][0]:.2f}-"
                  f"{res[t + '_spread'][1]:.2f}; CPU s/step JAX {res[j + '_cpu_s']:.2f}, PyTorch {res[t + '_cpu_s']:.2f})")
        print(f"  JAX training: {res['jax_train_tflops_per_device']:.3f} TFLOP/s per device (dit_jax/analysis/mfu.py)")
        for k in ("jax_peak_gib", "torch_peak_gib", "jax_peak_rss_gib", "torch_peak_rss_gib"):
            if k in res:
                print(f"  {k}: {res[k]:.2f}")
        if args.json:
            print(json.dumps(res))
    return res


if __name__ == "__main__":
    # Before JAX starts; both frameworks share this process and its settings (not applied when imported).
    cpu_malloc.configure(verbose=True)
    main()
