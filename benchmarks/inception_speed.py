"""FID Inception feature extraction, images/s: the Flax network vs pytorch-fid's InceptionV3, same weights, one run.

    python -m benchmarks.inception_speed                          # CPU: 256 px uint8 images, batch 16
    python -m benchmarks.inception_speed --variants fused,unfused,fused-bf16 --batch 8,16,32
    python -m benchmarks.inception_speed --images 50000 --batch 250 --skip-torch   # GPU: one 50k-image pass

Both sides start from the same uint8 NHWC batch in host memory and end with pool_3 features on the host
(pytorch-fid: x / 255 as NCHW float, its own resize and scaling; JAX: the whole of InceptionV3.__call__,
which also computes the spatial features and logits). Calls alternate between the variants (A B A B ...)
so that load from other processes hits all alike; the median wall time per batch is reported.
JAX variants: fused (the 1x1 convolutions of a block as one, the default) or unfused (one per PyTorch
layer), float32 or bf16 compute (-bf16), NHWC or NCHW activations (-nchw), compiled as FeatureExtractor
compiles it (XLA:CPU's Eigen kernels, dit_jax.utils.xla_cpu) or with XLA's default YNNPACK fusions (-ynn). pytorch-fid is loaded through convert.reference.pytorch_fid (torchvision's
package init is not run); with --skip-torch, or when it is not installed, only JAX is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import timed_interleaved
from dit_jax.utils import cpu_malloc


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", default="16", help="comma-separated batch sizes (images per call)")
    ap.add_argument("--variants", default="fused",
                    help="comma-separated; each is fused|unfused, optionally -bf16, -nchw, -ynn (e.g. fused-ynn)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--images", type=int, default=0,
                    help="also time one FeatureExtractor.extract pass over this many images (last --batch; "
                         "dtype of the first variant)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 32 px, batch 2, 1 iteration, fused only")
    return ap.parse_args(argv)


def jax_variant(name: str, params):
    from dit_jax.evaluation.inception import inception_forward, with_fused_heads
    from dit_jax.utils import xla_cpu

    tokens = name.split("-")
    fuse = "unfused" not in tokens
    dtype = jnp.bfloat16 if "bf16" in tokens else jnp.float32
    layout = "NCHW" if "nchw" in tokens else "NHWC"
    # as FeatureExtractor runs it: XLA:CPU's Eigen kernels (dit_jax.utils.xla_cpu), or -ynn: XLA's default
    options = None if "ynn" in tokens else xla_cpu.compiler_options()
    fn = jax.jit(lambda p, x: inception_forward(p, x, dtype=dtype, fuse=fuse, layout=layout)["pool"],
                 compiler_options=options)
    params = with_fused_heads(params) if fuse else params
    return lambda images: np.asarray(fn(params, images))


def torch_variant(ref):
    import torch

    def run(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return ref.wrapper(x)[0].flatten(1).numpy()

    return run


def main(argv=None):
    args = parse(argv)
    if args.tiny:
        args.image_size, args.batch, args.iters, args.warmup, args.variants = 32, "2", 1, 1, "fused"
    ref = None
    if not args.skip_torch:
        try:
            from convert.reference.pytorch_fid import TorchInception

            ref = TorchInception(seed=0)
            if args.torch_threads:
                import torch

                torch.set_num_threads(args.torch_threads)
        except ImportError as e:
            print(f"pytorch-fid not timed: {e}", file=sys.stderr)
    if ref is not None:
        params = ref.flax_params()
    else:  # random weights straight from the Flax initializer
        from dit_jax.evaluation.inception import init_params

        params = init_params(0)
    params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params))
    print(f"devices: {jax.devices()}; torch threads: "
          f"{__import__('torch').get_num_threads() if ref is not None else '-'}", flush=True)
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        images = np.random.default_rng(0).integers(0, 256, (batch, args.image_size, args.image_size, 3), np.uint8)
        fns = {f"jax-{v}": jax_variant(v, params) for v in args.variants.split(",")}
        if ref is not None:
            fns["pytorch-fid"] = torch_variant(ref)
        t0 = time.perf_counter()
        for f in fns.values():  # compile outside the timing
            f(images)
        compile_s = time.perf_counter() - t0
        times = timed_interleaved({k: (lambda f=f: f(images)) for k, f in fns.items()},
                                  {k: (lambda _: None) for k in fns}, args.warmup, args.iters)
        base = times.get("pytorch-fid", {}).get("s")
        for name, t in times.items():
            row = {"name": name, "batch": batch, "image_size": args.image_size, "s_per_batch": round(t["s"], 4),
                   "images_per_s": round(batch / t["s"], 2), "min_s": round(t["min_s"], 4),
                   "max_s": round(t["max_s"], 4)}
            if base:
                row["vs_pytorch_fid"] = round(base / t["s"], 3)
            results.append(row)
            print(f"batch {batch:4d}  {name:20s} {batch / t['s']:8.2f} images/s  ({t['s']:.3f} s per batch, "
                  f"min {t['min_s']:.3f} max {t['max_s']:.3f})" + (f"  {base / t['s']:.2f}x pytorch-fid" if base else ""),
                  flush=True)
        print(f"  (first calls incl. compile: {compile_s:.1f} s)", flush=True)
    if args.images:
        from dit_jax.evaluation.features import FeatureExtractor

        batch = int(args.batch.split(",")[-1])
        block = np.random.default_rng(1).integers(0, 256, (batch, args.image_size, args.image_size, 3), np.uint8)

        class Repeated:  # n images that cycle through one block: the timing is the network's, not the disk's
            def __len__(self):
                return args.images

            def read(self, start, stop):
                return block[np.arange(start, stop) % batch]

        per_device = max(1, batch // jax.device_count())
        dtype = jnp.bfloat16 if "bf16" in args.variants.split(",")[0] else jnp.float32
        ext = FeatureExtractor(params, per_device_batch=per_device, dtype=dtype)
        ext(block[: ext.global_batch])  # compile
        t0 = time.perf_counter()
        feats = ext.extract(Repeated(), progress=False)
        dt = time.perf_counter() - t0
        n = args.images
        row = {"name": "extract", "images": n, "per_device_batch": per_device, "dtype": jnp.dtype(dtype).name,
               "s": round(dt, 2), "images_per_s": round(n / dt, 1), "pool_shape": list(feats["pool"].shape)}
        results.append(row)
        print(f"{n} images through FeatureExtractor.extract ({jnp.dtype(dtype).name}, {per_device} per device): "
              f"{dt:.1f} s, {n / dt:.1f} images/s", flush=True)
    print(json.dumps({"inception_speed": results}))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"inception_speed_{args.variants.replace(',', '_')}.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    cpu_malloc.configure(verbose=True)
    main()
