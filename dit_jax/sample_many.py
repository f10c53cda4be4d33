"""dit-jax-sample-many: N images across every local device and host, as PNGs plus one ADM-style .npz.

    dit-jax-sample-many --ckpt DiT-XL-2-256x256.pt --num-images 50000 --cfg-scale 1.5 --out-dir samples/run1
    # -> samples/run1/000000.png ... 049999.png and samples/run1.npz (arr_0: uint8 (N, H, W, 3))

Determinism: image i uses the key fold_in(PRNGKey(seed), i) and, with --labels random, a class drawn from
that key, so it does not depend on the number of devices or hosts. The indices are cut into chunks of
(per-device batch x local devices); chunk c runs on host c % process_count, each device taking
`--per-device-batch-size` consecutive indices (shard_map: every device runs the same single-device program).

Resuming: PNGs are written atomically (temporary name, then rename) and a chunk whose PNGs all exist is
skipped, so rerunning the same command after a kill only does the missing work. run.json in the output
folder records the settings that change images; a rerun with different settings is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax import sample as S
from dit_jax.atomic import atomic_path

RUN_FILE = "run.json"


def shard_map_fn(f, mesh, in_specs, out_specs):
    """jax.shard_map (jax >= 0.6) or the older experimental one."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dit-jax-sample-many", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S.add_common_args(p)
    p.add_argument("--num-images", "--num-fid-samples", dest="num_images", type=int, default=50_000)
    p.add_argument("--per-device-batch-size", type=int, default=16, help="images per device per call")
    p.add_argument("--labels", choices=("random", "balanced"), default="random",
                   help="random: a class drawn from each image's key; balanced: class = index %% num_classes")
    p.add_argument("--out-dir", default="samples", help="folder of the PNGs (000000.png, ...)")
    p.add_argument("--npz", default=None, help="the .npz to write at the end (default: <out-dir>.npz)")
    p.add_argument("--num-local-devices", type=int, default=None,
                   help="use only the first k local devices (default: all)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host jobs)")
    p.add_argument("--stop-after-batches", type=int, default=None,
                   help="testing aid: stop (as if killed) after this many computed batches")
    return p.parse_args(argv)


def png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def image_labels(seed: int, indices, num_classes: int, mode: str) -> np.ndarray:
    """Class label of each image index (int32)."""
    indices = np.asarray(indices, np.int64)
    if mode == "balanced":
        return (indices % num_classes).astype(np.int32)
    keys = S.image_keys(seed, indices)
    draw = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, num_classes))
    return np.asarray(draw(keys), np.int32)


def run_settings(args, model) -> dict:
    """What decides the pixels of image i (the batch size and device count do not)."""
    cfg = {k: getattr(model, k) for k in ("input_size", "patch_size", "hidden_size", "depth", "num_classes",
                                          "learn_sigma")}
    return {"ckpt": os.path.abspath(args.ckpt) if args.ckpt else f"release DiT-XL/2 {args.image_size or 256}px",
            "model": cfg, "vae": args.vae, "sampler": args.sampler, "steps": args.respacing or args.num_sampling_steps,
            "eta": args.eta, "cfg_scale": args.cfg_scale, "guide_all_channels": args.guide_all_channels,
            "seed": args.seed, "labels": args.labels, "dtype": args.dtype}


def check_run_file(out_dir: str, settings: dict) -> None:
    """Writes run.json on the first run; refuses to mix images made with other settings."""
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise SystemExit(f"{out_dir} holds images made with other settings ({detail}); use a new --out-dir "
                             f"or delete {path} and the PNGs")
        return
    if jax.process_index() == 0:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(settings, f, indent=2)


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_npz(out_dir: str, num_images: int, path: str) -> str:
    """All PNGs 0..N-1 -> one .npz with arr_0 uint8 (N, H, W, 3), written atomically."""
    from PIL import Image

    missing = [i for i in range(num_images) if not os.path.exists(png_path(out_dir, i))]
    if missing:
        raise SystemExit(f"cannot write {path}: {len(missing)} PNGs are missing in {out_dir} "
                         f"(first {png_path(out_dir, missing[0])}); rerun the command to finish them")
    first = np.asarray(Image.open(png_path(out_dir, 0)).convert("RGB"))
    arr = np.empty((num_images,) + first.shape, np.uint8)
    for i in range(num_images):
        arr[i] = np.asarray(Image.open(png_path(out_dir, i)).convert("RGB"))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, arr_0=arr)
    return path


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """Returns the .npz path, or None when stopped early by --stop-after-batches."""
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    if args.num_images < 1 or args.per_device_batch_size < 1:
        raise SystemExit("--num-images and --per-device-batch-size must be >= 1")
    model, params = S.load_model(args)
    vae, vae_params = S.load_vae_arg(args.vae, args.dtype, args.cache_dir)
    S.check_image_size(args, model, vae)
    out_dir = args.out_dir.rstrip("/") or "."
    npz = args.npz or f"{out_dir}.npz"
    os.makedirs(out_dir, exist_ok=True)
    check_run_file(out_dir, run_settings(args, model))
    sync("dit_jax_sample_many_start")

    devices = jax.local_devices()
    if args.num_local_devices is not None:
        if not 1 <= args.num_local_devices <= len(devices):
            raise SystemExit(f"--num-local-devices {args.num_local_devices}: this host has {len(devices)}")
        devices = devices[: args.num_local_devices]
    mesh = Mesh(np.array(devices), ("data",))
    per_dev = args.per_device_batch_size
    chunk = per_dev * len(devices)
    host, hosts = jax.process_index(), jax.process_count()

    diffusion = S.make_diffusion(args, model)
    latents = S.latents_fn(model, diffusion, args.sampler, args.cfg_scale, args.eta, S.guidance_channels(args),
                           batch_chunk=args.model_batch_chunk)
    to_images = S.images_fn(vae)

    def per_device(p, vp, labels, keys):  # one device's (per_dev,) slice -> uint8 (per_dev, H, W, 3)
        return to_images(vp, latents(p, labels, keys))

    step = jax.jit(shard_map_fn(per_device, mesh, (P(), P(), P("data"), P("data")), P("data")))
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, replicated)
    vae_params = jax.device_put(vae_params, replicated) if vae_params is not None else None

    n = args.num_images
    my_chunks = [c for c in range(-(-n // chunk)) if c % hosts == host]
    todo = []
    for c in my_chunks:
        idx = list(range(c * chunk, min((c + 1) * chunk, n)))
        if not all(os.path.exists(png_path(out_dir, i)) for i in idx):
            todo.append(idx)
    mine = sum(len(range(c * chunk, min((c + 1) * chunk, n))) for c in my_chunks)
    S.log(f"host {host}/{hosts}: {len(devices)} devices x {per_dev} images per call; {mine} images for this "
          f"host, {sum(len(i) for i in todo)} to do in {len(todo)} batches; {diffusion.num_timesteps} "
          f"{args.sampler.upper()} steps, cfg-scale {args.cfg_scale}")

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=mine, initial=mine - sum(len(i) for i in todo), desc="images", unit="img", file=sys.stderr)
    t0, done_batches = time.time(), 0
    for idx in todo:
        padded = idx + [idx[-1]] * (chunk - len(idx))  # fixed shape: one compile; the padding is discarded
        labels = image_labels(args.seed, padded, model.num_classes, args.labels)
        keys = np.asarray(S.image_keys(args.seed, padded))
        images = step(params, vae_params, jax.device_put(labels, batched), jax.device_put(keys, batched))
        images = np.asarray(images)
        for j, i in enumerate(idx):
            if not os.path.exists(png_path(out_dir, i)):  # finished images are never rewritten
                S.save_png(images[j], png_path(out_dir, i))
        done_batches += 1
        if bar is not None:
            bar.update(len(idx))
        if args.stop_after_batches is not None and done_batches >= args.stop_after_batches:
            S.log(f"stopping after {done_batches} batches (--stop-after-batches)")
            if bar is not None:
                bar.close()
            return None
    if bar is not None:
        bar.close()
    S.log(f"host {host}: {len(todo)} batches in {time.time() - t0:.1f}s")

    sync("dit_jax_sample_many_done")
    if host == 0:
        write_npz(out_dir, n, npz)
        S.log(f"wrote {npz} (arr_0: {n} images)")
    sync("dit_jax_sample_many_npz")
    return npz


if __name__ == "__main__":
    main()
