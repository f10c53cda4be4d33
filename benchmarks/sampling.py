"""Whole sampling loops with classifier-free guidance, JAX vs the project's PyTorch reference, same weights.

    python -m benchmarks.sampling                          # DiT-S/2, 256 px, batch 8, DDIM 50 steps, cfg 4
    python -m benchmarks.sampling --samplers ddim50 ddpm250 --batch 2
    python -m benchmarks.sampling --tiny                   # smoke run (CI)

Both sides run the release's scheme: the batch is doubled with null labels, the DiT runs forward_with_cfg,
and the loop carries the guided half. JAX compiles the whole loop (lax.scan); compile time is reported apart.
As in dit-jax-sample, JAX evaluates the doubled batch 8 examples per DiT call on a CPU (`--model-batch-chunk`,
same results; ~11% faster there because the activations stay in cache). PyTorch is fastest with the whole
batch (measured per image: 90 ms at 8 and 16 examples, 103 ms at 4), so it keeps it.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import make_pair
from dit_jax.utils import cpu_malloc, xla_cpu
from dit_jax.cli.sample_args import batch_chunk_arg


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--samplers", nargs="+", default=["ddim50"], help="ddimN and/or ddpmN, e.g. ddim50 ddpm250")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side, JAX and PyTorch alternating (the median is reported)")
    ap.add_argument("--model-batch-chunk", default="auto", type=batch_chunk_arg,
                    help="JAX examples per DiT call (auto: 8 on CPU, whole batch on GPU; 0: whole batch), as in "
                         "dit-jax-sample; PyTorch always runs the whole doubled batch")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.depth, args.image_size, args.batch, args.samplers = 2, 64, 2, ["ddim5", "ddpm5"]
    return args


def jax_loop(args, model, params, noise, labels, sampler: str) -> dict:
    from dit_jax.diffusion import create_diffusion
    from dit_jax.guidance import dit_model_fn

    if args.dtype == "bfloat16":
        model = model.clone(dtype=jnp.bfloat16)
    kind, steps = sampler[:4], sampler[4:]
    diffusion = create_diffusion(("ddim" if kind == "ddim" else "") + steps)
    x_T = jnp.asarray(noise.transpose(0, 2, 3, 1))  # (N, H, W, C)
    y = jnp.asarray(labels, jnp.int32)

    @xla_cpu.jit  # compiled as dit_jax's samplers are
    def loop(params, x_T, y, rng):
        fn = dit_model_fn(model, params, y, cfg_scale=args.cfg_scale, batch_chunk=args.model_batch_chunk)
        if kind == "ddim":
            return diffusion.ddim_sample_loop(fn, x_T.shape, noise=x_T, eta=0.0)
        return diffusion.p_sample_loop(fn, x_T.shape, rng=rng, noise=x_T)

    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = loop.lower(params, x_T, y, rng).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, x_T, y, rng))  # warm-up run
    return (lambda: jax.block_until_ready(compiled(params, x_T, y, rng))), compile_s


def torch_loop(args, tmodel, noise, labels, sampler: str) -> dict:
    import torch

    from convert.reference.torch_diffusion import TorchDiffusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device).eval()
    kind, steps = sampler[:4], sampler[4:]
    diffusion = TorchDiffusion(("ddim" if kind == "ddim" else "") + steps)
    x_T = torch.from_numpy(noise).to(device)
    y = torch.from_numpy(labels).to(device)
    null = torch.full_like(y, tmodel.y_embedder.num_classes)
    n = x_T.shape[0]
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None

    def guided(x, t):
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out = tmodel.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), args.cfg_scale)
        return out[:n].float()

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        if kind == "ddim":
            out = diffusion.ddim_sample_loop(guided, x_T)
        else:
            out = diffusion.p_sample_loop(guided, x_T, generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    def run_no_grad():
        with torch.no_grad():
            return run()

    return run_no_grad


def main(argv=None) -> dict:
    args = parse(argv)
    latent = args.image_size // 8
    model, params, cfg, tmodel = make_pair(args.model, latent, depth=args.depth)
    rs = np.random.RandomState(0)
    noise = rs.randn(args.batch, 4, latent, latent).astype(np.float32)
    labels = rs.randint(0, cfg["num_classes"], size=args.batch).astype(np.int64)
    results = {}
    print(f"{args.model} latent {latent} batch {args.batch} cfg {args.cfg_scale} {args.dtype} "
          f"on {jax.devices()[0].platform}")
    for sampler in args.samplers:
        jax_run, compile_s = jax_loop(args, model, params, noise, labels, sampler)
        torch_run = torch_loop(args, tmodel, noise, labels, sampler)
        times, outputs = {"jax": [], "torch": []}, {}
        for _ in range(args.repeats):  # alternate the two sides so that outside load hits both alike
            for side, fn in (("jax", jax_run), ("torch", torch_run)):
                t0 = time.perf_counter()
                outputs[side] = fn()
                times[side].append(time.perf_counter() - t0)
        r = {"jax_s": float(np.median(times["jax"])), "torch_s": float(np.median(times["torch"])),
             "jax_compile_s": compile_s, "jax_runs_s": times["jax"], "torch_runs_s": times["torch"]}
        r["ratio"] = r["torch_s"] / r["jax_s"]
        # DDIM (eta 0) is deterministic: both loops must give the same x_0 from the same noise, else the speed
        # ratio compares different work. DDPM draws its noise from two different generators: not compared.
        if sampler.startswith("ddim"):
            jax_x0 = np.asarray(outputs["jax"], np.float64).transpose(0, 3, 1, 2)  # NHWC -> NCHW
            torch_x0 = outputs["torch"].double().cpu().numpy()
            r["ddim_rel_diff"] = float(np.max(np.abs(jax_x0 - torch_x0)) / np.max(np.abs(torch_x0)))
        results[sampler] = r
        print(f"  {sampler:8s} s/image: JAX {r['jax_s'] / args.batch:8.3f}  PyTorch {r['torch_s'] / args.batch:8.3f}"
              f"  speed-up {r['ratio']:.2f}x  (JAX compile {r['jax_compile_s']:.1f} s, not in the loop time)"
              + (f"  max|JAX - PyTorch| / max|PyTorch| {r['ddim_rel_diff']:.1e}" if "ddim_rel_diff" in r else ""))
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    # Before JAX starts; both frameworks share this process and its settings (not applied when imported).
    cpu_malloc.configure(verbose=True)
    main()
