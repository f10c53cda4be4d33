"""dit-jax-sample: a grid of class-conditional images from a DiT checkpoint (the release's sample.py in JAX).

    dit-jax-sample --image-size 256 --cfg-scale 4.0 --out sample.png          # downloads DiT-XL/2 + VAE
    dit-jax-sample --ckpt DiT-XL-2-256x256.pt --vae mse --sampler ddim --num-sampling-steps 50
    dit-jax-sample --ckpt out/my-dit --vae none --class-labels 1 2 3 --out latents.png

Image i of a run is seeded by fold_in(PRNGKey(seed), i), the same rule dit-jax-sample-many uses, so a
sample does not depend on the batch size. The whole diffusion loop of a batch is one jitted call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.atomic import atomic_path
from dit_jax.diffusion import GaussianDiffusion, create_diffusion, dit_model_fn
from dit_jax.images import make_grid  # noqa: F401  (also part of this module's interface)

RELEASE_CLASS_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # the release sample.py's default classes


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Arguments shared with dit-jax-sample-many
# ----------------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="DiT-XL/2 ... DiT-S/8; checked against --ckpt (default: read from the checkpoint, or "
                        "DiT-XL/2 when downloading)")
    p.add_argument("--image-size", type=int, default=None,
                   help="256 or 512 for the release weights (default: the checkpoint's latent size x 8)")
    p.add_argument("--num-sampling-steps", type=int, default=250)
    p.add_argument("--respacing", default=None,
                   help="timestep respacing string (e.g. 'ddim50', '10,10,10'); default: the step count")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (> 1 guides)")
    p.add_argument("--guide-all-channels", action="store_true",
                   help="guide all 4 eps channels (the release guides only the first 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default=None,
                   help="dit_jax model directory or PyTorch .pt/.pth/.safetensors/diffusers folder "
                        "(converted on the fly); default: download the released DiT-XL/2")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a .pt with full pickle (runs code from the file!) when weights_only fails")
    p.add_argument("--vae", default="mse",
                   help="mse | ema (downloaded via huggingface_hub) | PATH (diffusers folder or weights "
                        "file) | none (no decoding: preview the raw latents)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the DiT and VAE (params stay float32)")
    p.add_argument("--cache-dir", default=None, help="download cache (default $DIT_JAX_CACHE or ~/.cache/dit_jax)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--model-batch-chunk", default="auto", type=batch_chunk_arg,
                   help="examples per DiT call inside the loop: auto (8 on CPU, where smaller activations stay in "
                        "cache; everything at once on GPU/TPU), 0 = all at once, or a number; results are the same")


def batch_chunk_arg(value: str):
    """argparse type of --model-batch-chunk: "auto" or an integer >= 0 (see diffusion.resolve_batch_chunk)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}")
    return n


def parse_dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def load_model(args) -> Tuple[Any, Any]:
    """(DiT module, params) from --ckpt, or the release DiT-XL/2 for --image-size downloaded into the cache."""
    from dit_jax.model import SIZES
    from dit_jax.pretrained import load_any

    dtype = parse_dtype(args.dtype)
    path = args.ckpt
    if path is None:
        from dit_jax.download import DIT_IMAGE_SIZES, dit_checkpoint_path

        size = args.image_size or 256
        if args.model not in (None, "DiT-XL/2"):
            raise SystemExit(f"--model {args.model}: only DiT-XL/2 weights are released; pass --ckpt for other "
                             f"models")
        if size not in DIT_IMAGE_SIZES:
            raise SystemExit(f"--image-size {size}: released DiT-XL/2 weights exist for {DIT_IMAGE_SIZES}")
        path = dit_checkpoint_path(size, cache_dir=args.cache_dir, progress=not args.no_progress)
    if not os.path.exists(path):
        raise SystemExit(f"--ckpt {path}: no such file or directory")
    log(f"loading DiT weights from {path}")
    model, params = load_any(path, dtype=dtype, allow_pickle=args.allow_pickle, log=log)
    if args.model is not None:
        name = args.model
        try:
            size, patch = name[len("DiT-"):].split("/")
            depth, hidden, _ = SIZES[size]
            patch = int(patch)
        except (ValueError, KeyError):
            raise SystemExit(f"--model {name!r}: expected one of DiT-{{{','.join(SIZES)}}}/{{2,4,8}}") from None
        got = (model.depth, model.hidden_size, model.patch_size)
        if got != (depth, hidden, patch):
            raise SystemExit(f"--model {name} expects depth={depth}, hidden_size={hidden}, patch={patch}, but "
                             f"{path} holds depth={got[0]}, hidden_size={got[1]}, patch={got[2]}")
    return model, params


def load_vae_arg(spec: str, dtype_name: str, cache_dir: Optional[str]):
    """(vae, params), or (None, None) for --vae none."""
    if spec.lower() == "none":
        return None, None
    from dit_jax.vae import load_vae

    if spec not in ("mse", "ema") and not os.path.exists(spec):
        raise SystemExit(f"--vae {spec}: expected mse, ema, none or an existing path")
    log(f"loading VAE {spec}")
    return load_vae(spec, dtype=parse_dtype(dtype_name), cache_dir=cache_dir)


def check_image_size(args, model, vae) -> int:
    """The pixel size implied by the model's latent size; --image-size must agree with it."""
    factor = vae.downsample_factor if vae is not None else 8
    size = model.input_size * factor
    if args.image_size is not None and args.image_size != size:
        raise SystemExit(f"--image-size {args.image_size} does not match the checkpoint: its latent size "
                         f"{model.input_size} x {factor} (VAE downsampling) = {size} px")
    return size


def make_diffusion(args, model) -> GaussianDiffusion:
    """The release's sampling diffusion; fixed (large) variance when the model does not learn sigma."""
    spec = args.respacing or str(args.num_sampling_steps)
    return create_diffusion(spec, learn_sigma=bool(getattr(model, "learn_sigma", True)))


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def image_keys(seed: int, indices) -> jax.Array:
    """One key per image index: fold_in(PRNGKey(seed), index) -> (N, 2) raw keys."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def latents_fn(model, diffusion: GaussianDiffusion, sampler: str = "ddpm", cfg_scale: float = 1.0,
               eta: float = 0.0, guidance_channels: Optional[int] = 3, progress: bool = False,
               batch_chunk: Any = "auto") -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """fn(params, labels (N,), keys (N, 2)) -> latents (N, h, w, C); pure, so jit it (or shard_map it).

    Image i starts from x_T = normal(fold_in(keys[i], 0)) and its per-step noise comes from
    fold_in(keys[i], 1): nothing depends on the other images in the batch.
    """
    shape1 = (model.input_size, model.input_size, model.in_channels)

    def fn(params, labels, keys):
        n = labels.shape[0]
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape1))(keys)  # (N, h, w, C)
        loop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        model_fn = dit_model_fn(model, params, labels, cfg_scale, guidance_channels, batch_chunk)
        shape = (n,) + shape1
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, shape, loop_keys, noise=x_T, progress=progress)
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(model_fn, shape, loop_keys, noise=x_T, eta=eta, progress=progress)
        raise ValueError(f"sampler {sampler!r}: expected 'ddpm' or 'ddim'")

    return fn


def images_fn(vae) -> Callable[[Any, jax.Array], jax.Array]:
    """fn(vae_params, latents) -> uint8 images (N, H, W, 3); with vae None a preview of latent channels 0-2."""
    if vae is None:
        def preview(_, latents):
            # Raw latents are roughly N(0, 1): map [-3, 3] to [0, 255] (a picture of the latents, not an image).
            x = jnp.clip(latents[..., :3] / 3.0, -1.0, 1.0)
            return jnp.clip(127.5 * x + 128.0, 0, 255).astype(jnp.uint8)
        return preview
    from dit_jax.vae import AutoencoderKL, to_uint8

    def decode(vae_params, latents):
        images = vae.apply({"params": vae_params}, latents / vae.scaling_factor, method=AutoencoderKL.decode)
        return to_uint8(images)  # clamp to [-1, 1] and round like torchvision's save_image

    return decode


def save_png(array: np.ndarray, path: str) -> None:
    """Writes a uint8 (H, W, 3) PNG atomically: a temporary name in the same folder, then rename."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array, np.uint8)).save(tmp, format="PNG")


def save_npy(array: np.ndarray, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def guidance_channels(args) -> Optional[int]:
    return None if args.guide_all_channels else 3


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dit-jax-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help=f"one image per label (default: the release's {' '.join(map(str, RELEASE_CLASS_LABELS))})")
    p.add_argument("--batch-size", type=int, default=None, help="images per jitted call (default: all)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row")
    p.add_argument("--out", default="sample.png", help="PNG grid to write")
    p.add_argument("--save-latents", default=None, help="also write the sampled latents (N, h, w, C) as .npy")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    model, params = load_model(args)
    vae, vae_params = load_vae_arg(args.vae, args.dtype, args.cache_dir)
    size = check_image_size(args, model, vae)

    labels = list(args.class_labels if args.class_labels is not None else RELEASE_CLASS_LABELS)
    bad = [y for y in labels if not 0 <= y < model.num_classes]
    if bad:
        raise SystemExit(f"--class-labels {bad}: outside 0..{model.num_classes - 1} (the model's num_classes)")
    n = len(labels)
    batch = args.batch_size or n
    if batch < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {batch}")

    diffusion = make_diffusion(args, model)
    sample = jax.jit(latents_fn(model, diffusion, args.sampler, args.cfg_scale, args.eta, guidance_channels(args),
                                progress=not args.no_progress, batch_chunk=args.model_batch_chunk))
    decode = jax.jit(images_fn(vae))
    log(f"sampling {n} images of {size}px: {diffusion.num_timesteps} {args.sampler.upper()} steps, "
        f"cfg-scale {args.cfg_scale}, {args.dtype}, batch {batch}, device {jax.devices()[0].platform}")

    t0 = time.time()
    latents, images = [], []
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        pad = batch - len(idx)  # pad the last batch so every call has the same shape (one compile)
        idx_p = idx + [idx[-1]] * pad
        y = jnp.asarray([labels[i] for i in idx_p], jnp.int32)
        z = sample(params, y, image_keys(args.seed, idx_p))
        img = decode(vae_params, z)
        latents.append(np.asarray(z)[: len(idx)])
        images.append(np.asarray(img)[: len(idx)])
    latents, images = np.concatenate(latents), np.concatenate(images)
    log(f"sampled in {time.time() - t0:.1f}s")

    save_png(make_grid(images, nrow=args.nrow), args.out)
    if args.save_latents:
        save_npy(latents.astype(np.float32), args.save_latents)
    log(f"wrote {args.out}" + (f" and {args.save_latents}" if args.save_latents else ""))
    return args.out


if __name__ == "__main__":
    main()
