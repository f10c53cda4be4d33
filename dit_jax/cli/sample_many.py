"""dit-jax-sample-many: N images across every local device and host, as PNGs plus one ADM-style .npz.

    dit-jax-sample-many --ckpt DiT-XL-2-256x256.pt --num-images 50000 --cfg-scale 1.5 --out-dir samples/run1
    # -> samples/run1/000000.png ... 049999.png and samples/run1.npz (arr_0: uint8 (N, H, W, 3))
    dit-jax-sample-many --distributed ... --out-dir gs://bucket/samples/run1     # every host of a TPU pod

Determinism: image i uses the key fold_in(PRNGKey(seed), i) and, with --labels random, a class drawn from
that key, so it does not depend on the number of devices or hosts. The indices are cut into chunks of
(per-device batch x local devices); chunk c runs on host c % process_count, each device taking
`--per-device-batch-size` consecutive indices (shard_map: every device runs the same single-device program).

Resuming: PNGs are written atomically (temporary name, then rename; on a bucket one object, which appears
only when its upload is complete) and a chunk whose PNGs all exist is skipped, so rerunning the same command
after a kill only does the missing work; a local image counts as done only if it is a readable PNG of the
expected size (a 0-byte or cut-off file is made again). run.json in the output folder records the settings
that change images; a rerun with different settings is refused. --out-dir and --npz may be bucket URLs
(gs://...): every host writes its own PNGs there, host 0 reads them all back for the .npz.
Exit codes: 0 all images and the .npz written (or stopped by --stop-after-batches), 1 an error (one line on
stderr), 2 a usage error, 130 interrupted (finished images are kept; rerun to continue).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm.auto import tqdm

from dit_jax.cli import sample_args
from dit_jax.cli.common import (add_distributed_args, check_range, check_writable_dir, check_writable_file,
                                init_distributed, log_line, run_command)
from dit_jax.utils.errors import ConfigError
from dit_jax.sampling import image_keys, image_labels, images_fn, latents_fn
from dit_jax.utils import paths, xla_cpu
from dit_jax.utils.atomic import atomic_path, write_text
from dit_jax.utils.images import save_png

PROG = "dit-jax-sample-many"
RUN_FILE = "run.json"
READ_THREADS = 16  # PNGs read back at once from a bucket for the .npz (one request each)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample_args.add_common_args(p)
    p.add_argument("--num-images", "--num-fid-samples", dest="num_images", type=int, default=50_000)
    p.add_argument("--per-device-batch-size", type=int, default=16, help="images per device per call")
    p.add_argument("--labels", choices=("random", "balanced"), default="random",
                   help="random: a class drawn from each image's key; balanced: class = index %% num_classes")
    p.add_argument("--out-dir", default="samples", help="folder of the PNGs (000000.png, ...); local or gs://...")
    p.add_argument("--npz", default=None, help="the .npz to write at the end (default: <out-dir>.npz)")
    p.add_argument("--num-local-devices", type=int, default=None,
                   help="use only the first k local devices (default: all)")
    add_distributed_args(p)
    p.add_argument("--stop-after-batches", type=int, default=None,
                   help="testing aid: stop (as if killed) after this many computed batches")
    return p.parse_args(argv)


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def png_path(out_dir: str, index: int) -> str:
    return paths.join(out_dir, png_name(index))


def png_done(path: str, size: int) -> bool:
    """A finished image: a PNG that decodes completely and is size x size (0-byte and cut-off files are not)."""
    try:
        with paths.as_path(path).open("rb") as f, Image.open(f) as im:
            if im.size != (size, size):
                return False
            im.verify()  # reads every chunk and checks the CRCs
        return True
    except (OSError, SyntaxError, ValueError):  # missing, truncated or not a PNG
        return False


def run_settings(args, model) -> dict:
    """What decides the pixels of image i (the batch size and device count do not)."""
    cfg = {k: getattr(model, k) for k in ("input_size", "patch_size", "hidden_size", "depth", "num_classes",
                                          "learn_sigma")}
    return {"ckpt": paths.display(args.ckpt) if args.ckpt else f"release DiT-XL/2 {args.image_size or 256}px",
            "model": cfg, "vae": args.vae, "sampler": args.sampler, "steps": args.respacing or args.num_sampling_steps,
            "eta": args.eta, "cfg_scale": args.cfg_scale, "guide_all_channels": args.guide_all_channels,
            "seed": args.seed, "labels": args.labels, "dtype": args.dtype}


def check_run_file(out_dir: str, settings: dict) -> None:
    """Writes run.json on the first run; refuses to mix images made with other settings."""
    path = paths.join(out_dir, RUN_FILE)
    if paths.as_path(path).exists():
        old = json.loads(paths.as_path(path).read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ConfigError(f"{out_dir} holds images made with other settings ({detail}); use a new --out-dir "
                              f"or delete {path} and the PNGs")
        return
    if jax.process_index() == 0:
        write_text(path, json.dumps(settings, indent=2))


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def present_names(out_dir: str) -> set:
    """Names of the files in out_dir (one listing; on a bucket far cheaper than a request per image)."""
    folder = paths.as_path(out_dir)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def read_png(path: str) -> np.ndarray:
    with paths.as_path(path).open("rb") as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


def write_npz(out_dir: str, num_images: int, path: str) -> str:
    """All PNGs 0..N-1 -> one .npz with arr_0 uint8 (N, H, W, 3), written atomically."""
    present = present_names(out_dir)
    missing = [i for i in range(num_images) if png_name(i) not in present]
    if missing:
        raise ConfigError(f"cannot write {path}: {len(missing)} PNGs are missing in {out_dir} "
                          f"(first {png_path(out_dir, missing[0])}); rerun the command to finish them")
    first = read_png(png_path(out_dir, 0))
    arr = np.empty((num_images,) + first.shape, np.uint8)
    threads = READ_THREADS if paths.is_url(out_dir) else 1  # a bucket: requests overlap, order is kept
    with ThreadPoolExecutor(threads) as pool:
        for i, img in enumerate(pool.map(read_png, (png_path(out_dir, i) for i in range(num_images)))):
            arr[i] = img
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, arr_0=arr)
    return path


def check_args(args) -> None:
    sample_args.check_common_args(args)
    check_range(args.num_images, "--num-images", 1)
    check_range(args.per_device_batch_size, "--per-device-batch-size", 1)
    if args.num_local_devices is not None:
        check_range(args.num_local_devices, "--num-local-devices", 1, len(jax.local_devices()),
                    f" (this host has {len(jax.local_devices())})")
    check_writable_dir(args.out_dir, "--out-dir")
    check_writable_file(args.npz or f"{args.out_dir.rstrip('/') or '.'}.npz", "--npz")


def finished(out_dir: str, indices: List[int], size: int) -> set:
    """The indices whose PNG is done. On a bucket an object exists only once its upload is complete, so
    being listed is enough; a local file must also decode completely at the right size."""
    present = present_names(out_dir)
    trust = paths.is_url(out_dir)
    return {i for i in indices if png_name(i) in present and (trust or png_done(png_path(out_dir, i), size))}


def todo_batches(out_dir: str, n: int, chunk: int, size: int) -> Tuple[List[List[int]], int, set]:
    """This host's index batches that still miss an image, how many images this host owns, and which of
    them are finished."""
    host, hosts = jax.process_index(), jax.process_count()
    mine = [list(range(c * chunk, min((c + 1) * chunk, n))) for c in range(-(-n // chunk)) if c % hosts == host]
    done = finished(out_dir, [i for idx in mine for i in idx], size)
    todo = [idx for idx in mine if not all(i in done for i in idx)]
    return todo, sum(len(idx) for idx in mine), done


def sample_many(args) -> Optional[str]:
    """Samples the images of `args` and writes the .npz; returns its path (None when stopped early)."""
    init_distributed(args)  # before anything touches a device
    check_args(args)
    model, params = sample_args.load_model(args)
    vae, vae_params = sample_args.load_vae(args)
    sample_args.check_image_size(args, model, vae)
    size = model.input_size * (vae.downsample_factor if vae is not None else 1)  # PNG side (latent preview: 1x)
    out_dir = args.out_dir.rstrip("/") or "."
    npz = args.npz or f"{out_dir}.npz"
    paths.as_path(out_dir).mkdir(parents=True, exist_ok=True)  # (a bucket has no folders to make)
    check_run_file(out_dir, run_settings(args, model))
    sync("dit_jax_sample_many_start")

    devices = jax.local_devices()[: args.num_local_devices]
    mesh = Mesh(np.array(devices), ("data",))
    per_dev = args.per_device_batch_size
    chunk = per_dev * len(devices)
    diffusion = sample_args.make_diffusion(args, model)
    latents = latents_fn(model, diffusion, args.sampler, args.cfg_scale, args.eta,
                         sample_args.guidance_channels(args), batch_chunk=args.model_batch_chunk)
    to_images = images_fn(vae)

    def per_device(p, vp, labels, keys):  # one device's (per_dev,) slice -> uint8 (per_dev, H, W, 3)
        return to_images(vp, latents(p, labels, keys))

    # shard_map: every device runs the same single-device program on its slice
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=P("data")),
                   compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform))
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, replicated)
    vae_params = jax.device_put(vae_params, replicated) if vae_params is not None else None

    n, host = args.num_images, jax.process_index()
    todo, mine, done = todo_batches(out_dir, n, chunk, size)
    left = sum(len(i) for i in todo)
    log_line(f"host {host}/{jax.process_count()}: {len(devices)} devices x {per_dev} images per call; {mine} "
             f"images for this host, {left} to do in {len(todo)} batches; {diffusion.num_timesteps} "
             f"{args.sampler.upper()} steps, cfg-scale {args.cfg_scale}")
    t0 = time.time()
    with tqdm(total=mine, initial=mine - left, desc="images", unit="img", file=sys.stderr,
              disable=args.no_progress) as bar:
        for done_batches, idx in enumerate(todo, start=1):
            padded = idx + [idx[-1]] * (chunk - len(idx))  # fixed shape: one compile; the padding is discarded
            labels = image_labels(args.seed, padded, model.num_classes, args.labels)
            keys = np.asarray(image_keys(args.seed, padded))
            images = np.asarray(step(params, vae_params, jax.device_put(labels, batched),
                                     jax.device_put(keys, batched)))
            for j, i in enumerate(idx):
                if i not in done:  # finished images are never rewritten
                    save_png(images[j], png_path(out_dir, i))
            bar.update(len(idx))
            if args.stop_after_batches is not None and done_batches >= args.stop_after_batches:
                log_line(f"stopping after {done_batches} batches (--stop-after-batches)")
                return None
    log_line(f"host {host}: {len(todo)} batches in {time.time() - t0:.1f}s")

    sync("dit_jax_sample_many_done")
    if host == 0:
        write_npz(out_dir, n, npz)
        log_line(f"wrote {npz} (arr_0: {n} images)")
    sync("dit_jax_sample_many_npz")
    return npz


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: sample_many(args), argv,
                       on_interrupt=lambda: "finished images are kept; rerun the same command to continue")


if __name__ == "__main__":
    raise SystemExit(main())
