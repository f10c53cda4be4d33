"""dit-jax-sample: a grid of class-conditional images from a DiT checkpoint (the release's sample.py in JAX).

    dit-jax-sample --image-size 256 --cfg-scale 4.0 --out sample.png          # downloads DiT-XL/2 + VAE
    dit-jax-sample --ckpt DiT-XL-2-256x256.pt --vae mse --sampler ddim --num-sampling-steps 50
    dit-jax-sample --ckpt out/my-dit --vae none --class-labels 1 2 3 --out latents.png

Image i of a run is seeded by fold_in(PRNGKey(seed), i), the same rule dit-jax-sample-many uses, so a
sample does not depend on the batch size. The whole diffusion loop of a batch is one jitted call.
Exit codes: 0 written, 1 an error (one line on stderr), 2 a usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.cli import sample_args
from dit_jax.cli.common import check_range, check_writable_file, log_line, run_command
from dit_jax.utils.errors import ConfigError
from dit_jax.sampling import RELEASE_CLASS_LABELS, image_keys, images_fn, latents_fn
from dit_jax.utils.atomic import atomic_path
from dit_jax.utils import xla_cpu
from dit_jax.utils.images import make_grid, save_png

PROG = "dit-jax-sample"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample_args.add_common_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help=f"one image per label (default: the release's {' '.join(map(str, RELEASE_CLASS_LABELS))})")
    p.add_argument("--batch-size", type=int, default=None, help="images per jitted call (default: all)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row (>= 1)")
    p.add_argument("--out", default="sample.png", help="PNG grid to write (a local path or gs://...)")
    p.add_argument("--save-latents", default=None,
                   help="also write the sampled latents (N, h, w, C) as .npy (a local path or gs://...)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Everything that can be checked before the weights are read."""
    sample_args.check_common_args(args)
    check_range(args.nrow, "--nrow", 1)
    if args.batch_size is not None:
        check_range(args.batch_size, "--batch-size", 1)
    if args.class_labels is not None and not args.class_labels:
        raise ConfigError("--class-labels: give at least one label")
    check_writable_file(args.out, "--out")
    if args.save_latents:
        check_writable_file(args.save_latents, "--save-latents")


def sample(args) -> str:
    """Samples the grid of `args` (parsed flags) and writes it; returns the PNG path."""
    check_args(args)
    model, params = sample_args.load_model(args)
    vae, vae_params = sample_args.load_vae(args)
    size = sample_args.check_image_size(args, model, vae)
    labels = list(args.class_labels if args.class_labels is not None else RELEASE_CLASS_LABELS)
    bad = [y for y in labels if not 0 <= y < model.num_classes]
    if bad:
        raise ConfigError(f"--class-labels {bad}: outside 0..{model.num_classes - 1} (the model's num_classes)")
    n = len(labels)
    batch = args.batch_size or n

    diffusion = sample_args.make_diffusion(args, model)
    run = xla_cpu.jit(latents_fn(model, diffusion, args.sampler, args.cfg_scale, args.eta,
                             sample_args.guidance_channels(args), progress=not args.no_progress,
                             batch_chunk=args.model_batch_chunk))
    decode = xla_cpu.jit(images_fn(vae))
    log_line(f"sampling {n} images of {size}px: {diffusion.num_timesteps} {args.sampler.upper()} steps, "
             f"cfg-scale {args.cfg_scale}, {args.dtype}, batch {batch}, device {jax.devices()[0].platform}")
    t0 = time.time()
    latents, images = [], []
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        idx_p = idx + [idx[-1]] * (batch - len(idx))  # pad the last batch: every call has one shape (one compile)
        z = run(params, jnp.asarray([labels[i] for i in idx_p], jnp.int32), image_keys(args.seed, idx_p))
        latents.append(np.asarray(z)[: len(idx)])
        images.append(np.asarray(decode(vae_params, z))[: len(idx)])
    latents, images = np.concatenate(latents), np.concatenate(images)
    if not np.isfinite(latents).all():
        raise ConfigError(f"sampling produced non-finite latents ({np.mean(~np.isfinite(latents)):.0%} of values); "
                          f"nothing was written. Check the checkpoint and --respacing/--eta")
    log_line(f"sampled in {time.time() - t0:.1f}s")

    save_png(make_grid(images, nrow=args.nrow), args.out)
    if args.save_latents:
        with atomic_path(args.save_latents) as tmp, open(tmp, "wb") as f:
            np.save(f, latents.astype(np.float32))
    log_line(f"wrote {args.out}" + (f" and {args.save_latents}" if args.save_latents else ""))
    return args.out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: sample(args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
