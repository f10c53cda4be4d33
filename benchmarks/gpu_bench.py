"""GPU benchmark (run through benchmarks/gpu.sh): DiT-XL/2 training MFU and sampling speed, JAX vs PyTorch.

    python -m benchmarks.gpu_bench                         # H100: DiT-XL/2, 256 px, bf16, largest batch that fits
    python -m benchmarks.gpu_bench --tiny                  # CPU smoke run (CI)

Training: the release's step (diffusion loss, backward, AdamW, EMA) in bf16 compute with float32 parameters.
Images/s, and MFU = images/s * 3 * 2 * forward multiply-adds per image / measured bf16 matmul peak of the card.
PyTorch runs the same step with bf16 autocast, SDPA attention and torch.compile, in the same process.
Sampling: 250-step DDPM with classifier-free guidance, seconds per image.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (batch_inputs, jax_sync, make_jax_train_step, make_pair, make_torch_train_step,
                               timed, torch_sync_fn)
from benchmarks.flops import measure as measure_flops


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[512, 384, 256, 192, 128, 64, 32],
                    help="training batch sizes to try, largest first; the first that fits is used")
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--remat", action="store_true", help="rematerialise blocks in the JAX step")
    ap.add_argument("--attention", default="auto",
                    help="JAX attention: auto (cudnn on GPU, matmuls elsewhere) | cudnn | xla | matmul")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="PyTorch without torch.compile")
    ap.add_argument("--tiny", action="store_true", help="DiT-S/2 depth 2, 64 px, batch 2: a CPU smoke run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.depth, args.image_size = "DiT-S/2", 2, 64
        args.batches, args.sample_batch, args.sample_steps, args.iters = [2], 2, 3, 1
        args.skip_compile = True
    return args


def matmul_peak_tflops(dtype=jnp.bfloat16, n: int = 8192, iters: int = 10) -> float:
    """Measured dense matmul throughput of the first device (TFLOP/s)."""
    if jax.devices()[0].platform == "cpu":
        n, iters = 1024, 2
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    s = timed(lambda: f(a, b), jax_sync, 2, iters)
    return 2 * n**3 / s / 1e12


def jax_train(args, model, params, latent, num_classes, macs):
    from dit_jax.diffusion import create_diffusion

    impl = None if args.attention in ("auto", "matmul") else args.attention
    if args.attention == "auto" and jax.devices()[0].platform == "gpu":
        impl = "cudnn"  # flash attention; falls back to the matmul attention below if cuDNN refuses it
    model = model.clone(dtype=jnp.bfloat16, remat=args.remat, attention_impl=impl)
    diffusion = create_diffusion("")
    tx, step = make_jax_train_step(model, diffusion)
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit")
    for batch in args.batches:
        inp = batch_inputs(batch, latent, num_classes)
        x = jnp.asarray(inp["x"].transpose(0, 2, 3, 1))
        noise = jnp.asarray(inp["noise"].transpose(0, 2, 3, 1))
        y, t = jnp.asarray(inp["y"], jnp.int32), jnp.asarray(inp["t"], jnp.int32)
        opt_state = jax.eval_shape(tx.init, params)
        t0 = time.perf_counter()
        try:
            compiled = step.lower(params, opt_state, params, x, y, t, noise, jax.random.PRNGKey(0)).compile()
        except Exception as e:  # noqa: BLE001 - an out-of-memory compile means: try a smaller batch
            if model.attention_impl == "cudnn" and args.attention == "auto" and "memory" not in str(e).lower():
                print(f"  cuDNN attention does not compile ({type(e).__name__}: {str(e)[:120]}); using matmuls")
                model = model.clone(attention_impl=None)
                tx, step = make_jax_train_step(model, diffusion)
                compiled = step.lower(params, opt_state, params, x, y, t, noise, jax.random.PRNGKey(0)).compile()
            else:
                print(f"  JAX batch {batch}: does not compile ({type(e).__name__}), trying smaller")
                continue
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        need = None if mem is None else mem.temp_size_in_bytes + 3 * mem.argument_size_in_bytes
        if limit and need and need > 0.95 * limit:
            print(f"  JAX batch {batch}: needs {need / 2**30:.1f} GiB of {limit / 2**30:.1f}, trying smaller")
            continue
        state = [jax.tree_util.tree_map(jnp.copy, params), None, jax.tree_util.tree_map(jnp.copy, params)]
        state[1] = tx.init(state[0])

        def one():
            state[0], state[1], state[2], loss = compiled(state[0], state[1], state[2], x, y, t, noise,
                                                          jax.random.PRNGKey(0))
            return loss

        try:
            s = timed(one, jax_sync, 2, args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"  JAX batch {batch}: failed to run ({type(e).__name__}: {str(e)[:120]}), trying smaller")
            continue
        ips = batch / s
        return {"jax_train_batch": batch, "jax_train_ips": ips, "jax_train_compile_s": compile_s,
                "jax_train_tflops": ips * 6 * macs / 1e12}
    raise RuntimeError(f"no batch size in {args.batches} fits for JAX")


def torch_train(args, tmodel, latent, num_classes, macs):
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
               "torch_train_tflops": ips * 6 * macs / 1e12}
        if device == "cuda":
            out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
    raise RuntimeError(f"no batch size in {args.batches} fits for PyTorch")


def jax_sampling(args, model, params, latent, num_classes):
    from dit_jax.diffusion import create_diffusion
    from dit_jax.guidance import dit_model_fn

    model = model.clone(dtype=jnp.bfloat16)
    diffusion = create_diffusion(str(args.sample_steps))
    rs = np.random.RandomState(1)
    x_T = jnp.asarray(rs.randn(args.sample_batch, latent, latent, 4).astype(np.float32))
    y = jnp.asarray(rs.randint(0, num_classes, args.sample_batch), jnp.int32)

    @jax.jit
    def loop(params, x_T, y, rng):
        return diffusion.p_sample_loop(dit_model_fn(model, params, y, cfg_scale=4.0), x_T.shape, rng=rng, noise=x_T)

    t0 = time.perf_counter()
    compiled = loop.lower(params, x_T, y, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    s = timed(lambda: compiled(params, x_T, y, jax.random.PRNGKey(0)), jax_sync, 1, 1 if args.tiny else 2)
    return {"jax_sample_s_per_image": s / args.sample_batch, "jax_sample_compile_s": compile_s}


def _free_torch_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def main(argv=None) -> dict:
    args = parse(argv)
    latent = args.image_size // 8
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}; jax {jax.__version__}")
    _, macs, _ = measure_flops(args.model, args.image_size, depth=args.depth)
    peak = matmul_peak_tflops()
    print(f"{args.model} {args.image_size}px: {macs / 1e9:.2f} GMACs/image forward; training 6x = "
          f"{6 * macs / 1e9:.1f} GFLOP/image; measured bf16 matmul peak {peak:.1f} TFLOP/s")
    model, params, cfg, tmodel = make_pair(args.model, latent, depth=args.depth)
    res = {"model": args.model, "image_size": args.image_size, "peak_tflops": peak, "gmacs": macs / 1e9}
    if not args.skip_torch:  # PyTorch first, then its cache is emptied so JAX gets the whole card
        res.update(torch_train(args, tmodel, latent, cfg["num_classes"], macs))
        res["torch_mfu"] = res["torch_train_tflops"] / peak
        print(f"  PyTorch train: batch {res['torch_train_batch']}, {res['torch_train_ips']:.1f} img/s, "
              f"MFU {100 * res['torch_mfu']:.1f}%, first step (compile) {res['torch_first_step_s']:.1f} s")
    del tmodel
    _free_torch_memory()
    res.update(jax_train(args, model, params, latent, cfg["num_classes"], macs))
    res["jax_mfu"] = res["jax_train_tflops"] / peak
    print(f"  JAX     train: batch {res['jax_train_batch']}, {res['jax_train_ips']:.1f} img/s, "
          f"{res['jax_train_tflops']:.1f} TFLOP/s, MFU {100 * res['jax_mfu']:.1f}%, compile {res['jax_train_compile_s']:.1f} s")
    if "torch_train_ips" in res:
        res["train_ratio"] = res["jax_train_ips"] / res["torch_train_ips"]
        print(f"  JAX/PyTorch training images/s: {res['train_ratio']:.2f}x")
    res.update(jax_sampling(args, model, params, latent, cfg["num_classes"]))
    print(f"  JAX sampling: {args.sample_steps}-step DDPM, cfg 4, batch {args.sample_batch}: "
          f"{res['jax_sample_s_per_image']:.3f} s/image (compile {res['jax_sample_compile_s']:.1f} s)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
