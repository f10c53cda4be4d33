"""Flags and loading shared by `dit-jax-sample` and `dit-jax-sample-many`: the model, the VAE, the sampler.

Every value is checked here, before any weights are read or anything is computed.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Tuple

import convert
from convert import vae_weights
from dit_jax.nn.attention import IMPLEMENTATIONS
from dit_jax.cli.common import check_local_dir, check_range, log_line
from dit_jax.diffusion import GaussianDiffusion
from dit_jax.diffusion_schedules import parse_respacing
from dit_jax.utils.errors import ConfigError
from dit_jax.model import DTYPES, DiT, parse_dtype, parse_model_name
from dit_jax.sampling import SAMPLERS, sampling_diffusion
from dit_jax.utils import paths
from dit_jax.utils.download import DIT_IMAGE_SIZES, dit_checkpoint_path
from dit_jax.vae import AutoencoderKL

MAX_DIFFUSION_STEPS = 1000


def batch_chunk_arg(value: str):
    """argparse type of --model-batch-chunk: "auto" or an integer >= 0 (see guidance.resolve_batch_chunk)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}")
    return n


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="DiT-XL/2 ... DiT-S/8; checked against --ckpt (default: read from the checkpoint, or "
                        "DiT-XL/2 when downloading)")
    p.add_argument("--image-size", type=int, default=None,
                   help="256 or 512 for the release weights (default: the checkpoint's latent size x 8)")
    p.add_argument("--num-sampling-steps", type=int, default=250, help=f"1..{MAX_DIFFUSION_STEPS}")
    p.add_argument("--respacing", default=None,
                   help="timestep respacing string (e.g. 'ddim50', '10,10,10'); default: the step count")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (0 = deterministic)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale >= 1 (1 = none)")
    p.add_argument("--guide-all-channels", action="store_true",
                   help="guide all 4 eps channels (the release guides only the first 3)")
    p.add_argument("--seed", type=int, default=0, help="a non-negative integer")
    p.add_argument("--ckpt", default=None,
                   help="dit_jax model directory or PyTorch .pt/.pth/.safetensors/diffusers folder "
                        "(converted on the fly), local or a bucket URL (gs://...); default: download the released "
                        "DiT-XL/2")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a .pt with full pickle (runs code from the file!) when weights_only fails")
    p.add_argument("--vae", default="mse",
                   help="mse | ema (downloaded via huggingface_hub) | PATH (diffusers folder or weights "
                        "file, local or gs://...) | none (no decoding: preview the raw latents)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype of the DiT and VAE (params stay float32)")
    p.add_argument("--attention-impl", choices=IMPLEMENTATIONS, default="auto",
                   help="attention kernel: auto (CPU matmuls, GPU cuDNN flash attention with bfloat16, TPU Pallas "
                        "flash attention at 512 px, else XLA's), or one everywhere (dit_jax/nn/attention.py)")
    p.add_argument("--cache-dir", default=None, help="download cache (default $DIT_JAX_CACHE or ~/.cache/dit_jax)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--model-batch-chunk", default="auto", type=batch_chunk_arg,
                   help="examples per DiT call inside the loop: auto (8 on CPU, where smaller activations stay in "
                        "cache; everything at once on GPU/TPU), 0 = all at once, or a number; results are the same")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")


def check_common_args(args) -> None:
    """Ranges of the shared numeric flags (before any work)."""
    check_range(args.num_sampling_steps, "--num-sampling-steps", 1, MAX_DIFFUSION_STEPS)
    check_range(args.eta, "--eta", 0.0, 1.0, " (0 = deterministic DDIM)")
    check_range(args.cfg_scale, "--cfg-scale", 1.0, None, " (1 = no guidance)")
    check_range(args.seed, "--seed", 0, 2**32 - 1)
    if args.image_size is not None:
        check_range(args.image_size, "--image-size", 8, None)
    if args.vae.lower() not in ("mse", "ema", "none") and not paths.as_path(args.vae).exists():
        raise ConfigError(f"--vae {args.vae}: expected mse, ema, none or an existing path")
    if args.ckpt is not None and not paths.as_path(args.ckpt).exists():
        raise ConfigError(f"--ckpt {args.ckpt}: no such file or directory")
    check_local_dir(args.cache_dir, "--cache-dir")
    if args.model is not None:
        try:
            parse_model_name(args.model)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
    respacing(args)


def respacing(args) -> str:
    """The respacing string of the flags, checked: a step count like "250", "ddimN" or comma-separated counts."""
    spec = args.respacing or str(args.num_sampling_steps)
    try:
        parse_respacing(spec, MAX_DIFFUSION_STEPS)
    except ValueError as e:
        raise ConfigError(f"--respacing {spec!r}: expected a step count like '250', 'ddimN' or comma-separated "
                          f"counts ({e})") from None
    return spec


def make_diffusion(args, model: DiT) -> GaussianDiffusion:
    return sampling_diffusion(model, respacing(args))


def load_model(args) -> Tuple[DiT, Any]:
    """(DiT module, params) from --ckpt, or the release DiT-XL/2 for --image-size downloaded into the cache."""
    path = args.ckpt
    if path is None:
        size = args.image_size or 256
        if args.model not in (None, "DiT-XL/2"):
            raise ConfigError(f"--model {args.model}: only DiT-XL/2 weights are released; pass --ckpt for other "
                              f"models")
        if size not in DIT_IMAGE_SIZES:
            raise ConfigError(f"--image-size {size}: released DiT-XL/2 weights exist for {DIT_IMAGE_SIZES}")
        path = dit_checkpoint_path(size, cache_dir=args.cache_dir, progress=not args.no_progress)
    log_line(f"loading DiT weights from {path}")
    model, params = convert.load_any(path, dtype=parse_dtype(args.dtype), allow_pickle=args.allow_pickle,
                                     log=log_line)
    model = model.clone(attention_impl=args.attention_impl)
    if args.model is not None:
        depth, hidden, _, patch = parse_model_name(args.model)
        got = (model.depth, model.hidden_size, model.patch_size)
        if got != (depth, hidden, patch):
            raise ConfigError(f"--model {args.model} expects depth={depth}, hidden_size={hidden}, patch={patch}, "
                              f"but {path} holds depth={got[0]}, hidden_size={got[1]}, patch={got[2]}")
    return model, params


def load_vae(args) -> Tuple[Optional[AutoencoderKL], Any]:
    """(vae, params), or (None, None) for --vae none."""
    if args.vae.lower() == "none":
        return None, None
    log_line(f"loading VAE {args.vae}")
    return vae_weights.load_vae(args.vae, dtype=parse_dtype(args.dtype), cache_dir=args.cache_dir)


def check_image_size(args, model: DiT, vae: Optional[AutoencoderKL]) -> int:
    """The pixel size implied by the model's latent size; --image-size must agree with it."""
    factor = vae.downsample_factor if vae is not None else 8
    size = model.input_size * factor
    if args.image_size is not None and args.image_size != size:
        raise ConfigError(f"--image-size {args.image_size} does not match the checkpoint: its latent size "
                          f"{model.input_size} x {factor} (VAE downsampling) = {size} px")
    return size


def guidance_channels(args) -> Optional[int]:
    return None if args.guide_all_channels else 3
