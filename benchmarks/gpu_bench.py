"""GPU benchmark (run through benchmarks/gpu.sh): DiT-XL/2 training and guided sampling, JAX vs PyTorch, one card.

    python -m benchmarks.gpu_bench                      # DiT-XL/2, 256 px, bf16, each side at its best batch
    python -m benchmarks.gpu_bench --xla-sweep          # also the XLA:GPU candidates of dit_jax/utils/xla_gpu.py
    python -m benchmarks.gpu_bench --tiny               # CPU smoke run (CI)

Training. JAX: the step `dit-jax-train` runs, built by the same code (configs/default.py -> train.setup ->
train.jit_train_step, shardings and donation included; benchmarks/product_step.py) in bf16 compute with
float32 parameters; the batch is pre-extracted latents. PyTorch: the release's step (diffusion loss,
backward, AdamW, EMA) with bf16 autocast, SDPA attention and torch.compile, in the same process and first
(its cache is emptied before JAX runs). Each side takes the largest batch of --batches that fits; JAX also
tries rematerialised blocks where a batch does not fit without. Reported: images/s, model TFLOP/s and MFU
against the card's RATED dense bf16 peak (dit_jax/analysis/mfu.py: 6 x forward multiply-adds x 2 per image), and beside
it, labelled, the MFU against a measured bf16 matmul peak of the same card.
Sampling. The release's loop (250-step DDPM, classifier-free guidance 4, the doubled batch, forward_with_cfg)
in PyTorch (convert/reference: torch_dit.py + torch_diffusion.py, bf16 autocast) beside dit_jax's (one
compiled lax.scan, bf16), same weights and noise; seconds per image.
XLA sweep (--xla-sweep): the JAX step at its best batch compiled with XLA's defaults and with each candidate
option set (dit_jax/utils/xla_gpu.py CANDIDATES), timed alternately; the winners to write into xla_gpu.OPTIONS.
Every section catches its own failure, prints it and goes on; the last line is the JSON of everything.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import batch_inputs, jax_sync, make_pair, make_torch_train_step, timed, timed_interleaved, \
    torch_sync_fn
from benchmarks.product_step import ProductStep, bench_config
from dit_jax.nn import attention
from dit_jax.analysis import mfu
from dit_jax.utils import xla_gpu

GIB = 2**30


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="training batch sizes to try, largest first (default: from the card's memory)")
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS,
                    help="JAX attention_impl (auto: cuDNN flash attention on an NVIDIA GPU in bf16)")
    ap.add_argument("--xla-sweep", action="store_true", help="time the XLA:GPU candidate options (xla_gpu.py)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="PyTorch without torch.compile")
    ap.add_argument("--tiny", action="store_true", help="DiT-S/2 depth 2, 64 px, batch 2: a CPU smoke run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.depth, args.image_size = "DiT-S/2", 2, 64
        args.batches, args.sample_batch, args.sample_steps, args.iters = [2], 2, 3, 2
        args.skip_compile = True  # and only the first XLA candidate: every compile costs seconds on a CPU
    return args


def default_batches(device) -> list:
    """Largest first; H200-class cards (141 GB) start at 256, 80 GB cards at 192."""
    limit = device_memory(device)
    if limit is None:
        return [8, 4]
    return [256, 192, 128, 64] if limit > 120 * GIB else [192, 128, 96, 64]


def device_memory(device):
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - some backends do not report
        return None


def matmul_peak_tflops(dtype=jnp.bfloat16, n: int = 8192, iters: int = 10) -> float:
    """Measured dense matmul throughput of the first device (TFLOP/s), for the labelled second MFU figure."""
    if jax.devices()[0].platform == "cpu":
        n, iters = 1024, 2
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    s = timed(lambda: f(a, b), jax_sync, 2, iters)
    return 2 * n**3 / s / 1e12


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def program_bytes(compiled):
    """Device bytes the compiled step needs (arguments + outputs not aliased + temporaries), or None."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)


def jax_step(args, batch: int, remat: bool, params, compiler_options=None):
    """(ProductStep ready to run, compile seconds) or (None, reason) when it does not fit or compile."""
    cfg = bench_config(args.model, args.image_size, batch, depth=args.depth, dtype="bfloat16", remat=remat,
                       attention_impl=args.attention)
    step = ProductStep(cfg)
    t0 = time.perf_counter()
    try:
        compiled = step.compile(compiler_options)
    except Exception as e:  # noqa: BLE001 - an out-of-memory compile means: try a smaller batch
        return None, f"does not compile ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    compile_s = time.perf_counter() - t0
    need, limit = program_bytes(compiled), device_memory(jax.devices()[0])
    if limit and need and need > 0.95 * limit:
        return None, f"needs {need / GIB:.1f} GiB of {limit / GIB:.1f}"
    step.init_state(params)
    return (step, compile_s), None


def resolved_attention(model) -> str:
    """The kernel the model's attention_impl stands for on this device (what "auto" chose)."""
    tokens, head_dim = (model.input_size // model.patch_size) ** 2, model.hidden_size // model.num_heads
    return attention.resolve(model.attention_impl, jax.devices()[0].platform, tokens, head_dim, model.dtype)


def time_jax_step(args, step) -> float:
    return timed(step, jax_sync, 2, args.iters)


def jax_train(args, params, flops_per_image):
    """The JAX product step at the largest batch that fits (remat only where needed), and the next smaller
    batch without remat when the best one needed remat; -> result dict of the faster."""
    tried = []
    for batch in args.batches:
        for remat in (False, True):
            built, why = jax_step(args, batch, remat, params)
            label = f"batch {batch}{' remat' if remat else ''}"
            if built is None:
                print(f"  JAX {label}: {why}")
                continue
            step, compile_s = built
            built = None
            try:
                s = time_jax_step(args, step)
            except Exception as e:  # noqa: BLE001 - out of memory at run time
                print(f"  JAX {label}: failed to run ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                del step
                continue
            ips = batch / s
            print(f"  JAX {label}: {ips:.1f} img/s, step {1e3 * s:.0f} ms, compile {compile_s:.1f} s")
            tried.append({"jax_train_batch": batch, "jax_train_remat": remat, "jax_train_ips": ips,
                          "jax_train_compile_s": compile_s, "jax_attention": resolved_attention(step.model),
                          "jax_train_tflops": ips * flops_per_image / 1e12})
            del step
            break
        if tried and (not tried[0]["jax_train_remat"] or len(tried) > 1):
            break
    if not tried:
        raise RuntimeError(f"no batch size in {args.batches} fits for JAX")
    return max(tried, key=lambda r: r["jax_train_ips"])


def torch_train(args, tmodel, latent, num_classes, flops_per_image):
    import torch

    from convert.reference.torch_diffusion import TorchDiffusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device)
    compiled = tmodel if args.skip_compile else torch.compile(tmodel)
    for batch in args.batches:
        inp = batch_inputs(batch, latent, num_classes)
        x, noise = torch.from_numpy(inp["x"]).to(device), torch.from_numpy(inp["noise"]).to(device)
        y, t = torch.from_numpy(inp["y"]).to(device), torch.from_numpy(inp["t"]).to(device)
        step = make_torch_train_step(tmodel, TorchDiffusion(""), autocast_dtype=torch.bfloat16, forward=compiled)
        try:
            t0 = time.perf_counter()
            step(x, y, t, noise)
            torch_sync_fn(device)(None)
            compile_s = time.perf_counter() - t0
            s = timed(lambda: step(x, y, t, noise), torch_sync_fn(device), 1, args.iters)
        except torch.cuda.OutOfMemoryError:
            print(f"  PyTorch batch {batch}: out of memory, trying smaller")
            del step
            torch.cuda.empty_cache()
            continue
        ips = batch / s
        out = {"torch_train_batch": batch, "torch_train_ips": ips, "torch_first_step_s": compile_s,
               "torch_train_tflops": ips * flops_per_image / 1e12}
        if device == "cuda":
            out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        return out
    raise RuntimeError(f"no batch size in {args.batches} fits for PyTorch")


def xla_sweep(args, params, best) -> dict:
    """The best JAX configuration compiled with XLA's defaults and with each candidate option set, all run on one
    state (one copy of it in memory) and timed alternately."""
    batch, remat = best["jax_train_batch"], best["jax_train_remat"]
    built, why = jax_step(args, batch, remat, params)
    if built is None:
        raise RuntimeError(f"the best configuration no longer fits: {why}")
    step = built[0]
    calls = {"defaults": lambda compiled=step.compiled: step(compiled)}  # XLA's defaults (+ xla_gpu.OPTIONS)
    for name, opts in list(xla_gpu.CANDIDATES.items())[:1 if args.tiny else None]:
        try:
            compiled = step.compile(opts)
        except Exception as e:  # noqa: BLE001 - an option this XLA does not know
            print(f"  XLA option set {name}: does not compile ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            continue
        calls[name] = lambda compiled=compiled: step(compiled)
    times = timed_interleaved(calls, {name: jax_sync for name in calls}, 1, args.iters)
    base = batch / times["defaults"]["s"]
    out = {}
    for name, r in times.items():
        ips = batch / r["s"]
        out[name] = {"ips": ips, "vs_defaults": ips / base, "options": xla_gpu.CANDIDATES.get(name, {})}
        print(f"  XLA {name:26s}: {ips:8.1f} img/s  {ips / base:.3f}x the defaults")
    winners = {k: v for name, r in out.items() if name != "defaults" and r["vs_defaults"] > 1 + xla_gpu.NOISE
               for k, v in r["options"].items()}
    print(f"  XLA winners (> {100 * xla_gpu.NOISE:.0f}% over the defaults; put them in dit_jax/utils/xla_gpu.py "
          f"OPTIONS, then confirm all together with {xla_gpu.ENV}): {winners or 'none'}")
    return {"xla_sweep": out, "xla_winners": winners}


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def sampling_inputs(args, latent, num_classes):
    rs = np.random.RandomState(1)
    noise = rs.randn(args.sample_batch, 4, latent, latent).astype(np.float32)
    labels = rs.randint(0, num_classes, size=args.sample_batch).astype(np.int64)
    return SimpleNamespace(dtype="bfloat16", cfg_scale=4.0, model_batch_chunk="auto"), noise, labels, \
        f"ddpm{args.sample_steps}"


def torch_sampling(args, tmodel, latent, num_classes) -> dict:
    """The release's loop: 250-step guided DDPM in PyTorch (convert/reference), bf16 autocast; s/image."""
    from benchmarks import sampling as sampling_bench

    sargs, noise, labels, sampler = sampling_inputs(args, latent, num_classes)
    run = sampling_bench.torch_loop(sargs, tmodel, noise, labels, sampler)
    return {"torch_sample_s_per_image": timed(run, lambda _: None, 1, 1 if args.tiny else 2) / args.sample_batch}


def jax_sampling(args, model, params, latent, num_classes) -> dict:
    """dit_jax's loop (one compiled lax.scan) on the same weights and noise; s/image."""
    from benchmarks import sampling as sampling_bench

    sargs, noise, labels, sampler = sampling_inputs(args, latent, num_classes)
    run, compile_s = sampling_bench.jax_loop(sargs, model, params, noise, labels, sampler)  # runs it once
    return {"jax_sample_s_per_image": timed(run, lambda _: None, 0, 1 if args.tiny else 2) / args.sample_batch,
            "jax_sample_compile_s": compile_s}


def _free_torch_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _section(res: dict, name: str, fn) -> None:
    """Run one part; a failure is printed and recorded, and the benchmark goes on."""
    try:
        res.update(fn())
    except Exception as e:  # noqa: BLE001 - report and continue: a GPU session is short
        traceback.print_exc()
        res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"  {name}: FAILED ({res['errors'][name]})")


def mfu_text(tflops: float, rated, measured: float) -> str:
    rated_txt = (f"MFU {100 * tflops / rated.bf16_tflops:.1f}% of the rated {rated.bf16_tflops:g} TFLOP/s "
                 f"({rated.name})" if rated else "MFU: no rated peak for this device")
    return f"{tflops:.1f} TFLOP/s, {rated_txt}; {100 * tflops / measured:.1f}% of the measured matmul peak"


def main(argv=None) -> dict:
    args = parse(argv)
    latent = args.image_size // 8
    dev = jax.devices()[0]
    args.batches = args.batches or default_batches(dev)
    rated = mfu.rated_peak(dev.device_kind)
    print(f"device: {dev.platform} {dev.device_kind}; jax {jax.__version__}; rated dense bf16 peak "
          f"{rated.bf16_tflops if rated else 'unknown'} TFLOP/s ({rated.source if rated else 'not in dit_jax/analysis/mfu.py'})")
    model, params, cfg, tmodel = make_pair(args.model, latent, depth=args.depth)
    flops_per_image = mfu.train_flops_per_example(model)
    measured = matmul_peak_tflops()
    print(f"{args.model} {args.image_size}px: {flops_per_image / 6e9:.2f} GMACs/image forward; training "
          f"{flops_per_image / 1e9:.1f} GFLOP/image; measured bf16 matmul peak {measured:.1f} TFLOP/s")
    res = {"model": args.model, "image_size": args.image_size, "device_kind": dev.device_kind,
           "rated_peak_tflops": rated.bf16_tflops if rated else None, "measured_peak_tflops": measured,
           "train_gflop_per_image": flops_per_image / 1e9, "jax_version": jax.__version__}
    if not args.skip_torch:  # PyTorch first, then its cache is emptied so JAX gets the whole card
        sample_tmodel = copy.deepcopy(tmodel)  # untrained: the same weights as JAX's for sampling
        _section(res, "torch_train", lambda: torch_train(args, tmodel, latent, cfg["num_classes"], flops_per_image))
        if "torch_train_ips" in res:
            print(f"  PyTorch train: batch {res['torch_train_batch']}, {res['torch_train_ips']:.1f} img/s, "
                  f"{mfu_text(res['torch_train_tflops'], rated, measured)}; first step (compile) "
                  f"{res['torch_first_step_s']:.1f} s")
        del tmodel
        _free_torch_memory()
        if not args.skip_sampling:  # before JAX, whose allocator keeps what it grows to
            _section(res, "torch_sampling", lambda: torch_sampling(args, sample_tmodel, latent, cfg["num_classes"]))
        del sample_tmodel
        _free_torch_memory()
    _section(res, "jax_train", lambda: jax_train(args, params, flops_per_image))
    if "jax_train_ips" in res:
        print(f"  JAX     train: batch {res['jax_train_batch']}{' remat' if res['jax_train_remat'] else ''}, "
              f"attention {res['jax_attention']}, {res['jax_train_ips']:.1f} img/s, "
              f"{mfu_text(res['jax_train_tflops'], rated, measured)}")
        res["jax_mfu_rated"] = res["jax_train_tflops"] / rated.bf16_tflops if rated else None
        res["jax_mfu_measured_peak"] = res["jax_train_tflops"] / measured
    if "torch_train_ips" in res:
        res["torch_mfu_rated"] = res["torch_train_tflops"] / rated.bf16_tflops if rated else None
        res["torch_mfu_measured_peak"] = res["torch_train_tflops"] / measured
    if "jax_train_ips" in res and "torch_train_ips" in res:
        res["train_ratio"] = res["jax_train_ips"] / res["torch_train_ips"]
        jax_mfu = f"{100 * res['jax_mfu_rated']:.1f}%" if res.get("jax_mfu_rated") else "n/a (no rated peak)"
        print(f"  JAX/PyTorch training images/s, each at its best batch: {res['train_ratio']:.2f}x (target 1.2x); "
              f"JAX MFU {jax_mfu} of rated (target 50%)")
    print(json.dumps(res), flush=True)  # the training numbers, even if what follows fails
    if args.xla_sweep and "jax_train_ips" in res:
        _section(res, "xla_sweep", lambda: xla_sweep(args, params, res))
    if not args.skip_sampling:
        _section(res, "jax_sampling", lambda: jax_sampling(args, model, params, latent, cfg["num_classes"]))
        if "jax_sample_s_per_image" in res:
            line = (f"  sampling, {args.sample_steps}-step DDPM, cfg 4, batch {args.sample_batch} (doubled inside), "
                    f"bf16: JAX {res['jax_sample_s_per_image']:.4f} s/image (compile {res['jax_sample_compile_s']:.1f} s)")
            if "torch_sample_s_per_image" in res:
                res["sample_speedup"] = res["torch_sample_s_per_image"] / res["jax_sample_s_per_image"]
                line += (f", PyTorch (the release's loop) {res['torch_sample_s_per_image']:.4f} s/image: JAX "
                         f"{res['sample_speedup']:.2f}x faster (target 1.2x)")
            print(line)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(0 if not main().get("errors") else 1)
