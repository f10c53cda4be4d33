"""dit-jax-extract-latents: encode an image data set once into VAE latents (the fast-DiT approach).

    dit-jax-extract-latents --folder /data/imagenet/train --image_size 256 --vae ema --out /data/latents256
    dit-jax-extract-latents --tfds imagenet2012 --data_dir ~/tensorflow_datasets --out /data/latents256

Each example is stored as the posterior mean and std of the image and of its mirror image
(dit_jax/training/latent_extraction.py, layout in dit_jax/data/latents.py), locally or in a bucket (--out gs://...);
a killed run, rerun with the same command, skips the finished shards. Each process of a multi-host job
(--distributed) encodes and writes its own shards.
Exit codes: 0 done, 1 an error (one line on stderr; --debug for the traceback), 2 a usage error,
130 interrupted (finished shards are kept).
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

import jax

from convert import vae_weights
from dit_jax.cli.common import add_distributed_args, check_range, check_writable_dir, init_distributed, run_command
from dit_jax.cli.config_file import load_config
from dit_jax.data import image_reader
from dit_jax.training.latent_extraction import extract
from dit_jax.utils import paths
from dit_jax.utils.errors import ConfigError

PROG = "dit-jax-extract-latents"


def load_config_data(spec: str) -> dict:
    """config.data of a training config (PATH[:VARIANT] or a shipped name, as dit-jax-train's --config)."""
    config = load_config(spec)
    if "data" not in config:
        raise ConfigError(f"--config {spec}: the config has no data section (config.data)")
    return dict(config.data)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    src = p.add_argument_group("data (a folder of class sub-folders, or a tfds data set)")
    src.add_argument("--config", default="", help="a training config (PATH[:VARIANT] or a shipped name such as "
                                                  "default:XL/2,512); its config.data gives the defaults")
    src.add_argument("--folder", default=None, help="DIR/<class>/<image> (the release's ImageFolder input; a path or URL)")
    src.add_argument("--tfds", default=None, help="tfds data set name, e.g. imagenet2012")
    src.add_argument("--data-dir", "--data_dir", default=None, help="tfds data_dir")
    src.add_argument("--manual-dir", "--manual_dir", default=None, help="tfds manual_dir (imagenet2012 tars)")
    src.add_argument("--split", default=None, help="tfds split (default train)")
    src.add_argument("--image-size", "--image_size", type=int, default=None, help="256 or 512 (default 256)")
    p.add_argument("--out", required=True, help="output directory or bucket URL (gs://...; created; rerun to resume)")
    p.add_argument("--vae", default=None, help="mse | ema | path to a diffusers VAE (default ema)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=64,
                   help="images per encode call (x2 for the mirrors); a multiple of the local device count")
    p.add_argument("--shard-size", "--shard_size", type=int, default=1024, help="examples per shard file (>= 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    p.add_argument("--num-workers", "--num_workers", type=int, default=8, help="image decode threads (>= 1)")
    add_distributed_args(p)
    p.add_argument("--no-progress", "--no_progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p.parse_args(argv)


def data_config(args) -> dict:
    """config.data-like dict from --config and the data flags (flags win)."""
    cfg = {"name": "tfds", "tfds_name": "imagenet2012", "data_dir": "", "manual_dir": "", "split": "train",
           "folder": "", "image_size": 256, "vae": "ema"}
    if args.config:
        cfg.update({k: v for k, v in load_config_data(args.config).items() if k in cfg and v is not None})
    if args.folder is not None and args.tfds is not None:
        raise ConfigError("give --folder or --tfds, not both")
    if args.folder is not None:
        cfg.update(name="folder", folder=args.folder)
    if args.tfds is not None:
        cfg.update(name="tfds", tfds_name=args.tfds)
    for k in ("data_dir", "manual_dir", "split", "image_size", "vae"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if cfg["name"] not in ("folder", "tfds"):
        raise ConfigError(f"data name {cfg['name']!r} cannot be extracted: pass --folder DIR or --tfds NAME")
    return cfg


def extract_latents(args) -> dict:
    check_range(args.batch_size, "--batch-size", 1)
    check_range(args.shard_size, "--shard-size", 1)
    check_range(args.num_workers, "--num-workers", 1)
    cfg = data_config(args)
    check_range(cfg["image_size"], "--image-size", 8)
    if not paths.is_url(args.out):  # a bucket is checked by the first write
        check_writable_dir(args.out, "--out")
    init_distributed(args)  # before anything touches a device
    reader = image_reader(cfg, jax.process_count())
    vae, params = vae_weights.load_vae(cfg["vae"])
    data_desc = ({"name": "folder", "folder": paths.display(cfg["folder"])} if cfg["name"] == "folder" else
                 {"name": "tfds", "tfds_name": cfg["tfds_name"], "split": cfg["split"]})
    stats = extract(reader, args.out, vae, params, batch_size=args.batch_size, shard_size=args.shard_size,
                    process_index=jax.process_index(), process_count=jax.process_count(), dtype=args.dtype,
                    settings={"data": data_desc, "vae": cfg["vae"]}, num_workers=args.num_workers,
                    progress=not args.no_progress)
    print(f"{args.out}: {stats['written']} shards written, {stats['already_done']} already done "
          f"(of {stats['num_shards']}); {stats['skipped_images']} unreadable images replaced")
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_command(PROG, lambda: extract_latents(args), argv,
                       on_interrupt=lambda: f"finished shards in {args.out} are kept; rerun to continue")


if __name__ == "__main__":
    raise SystemExit(main())
