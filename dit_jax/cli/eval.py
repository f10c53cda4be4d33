"""dit-jax-eval: ADM's sample-quality numbers (Inception Score, FID, sFID, precision, recall) in JAX.

    dit-jax-eval VIRTUAL_imagenet256_labeled.npz samples/xl2.npz          # ADM's five lines
    dit-jax-eval ref_stats.npz samples/ --json scores.json                # a folder of PNGs; statistics-only REF
    dit-jax-eval samples/xl2.npz --save-stats xl2_stats.npz                # mu, sigma, mu_s, sigma_s (float64)
    dit-jax-eval ref_stats.npz xl2_stats.npz                              # FID, sFID only; no Inception weights
    dit-jax-eval --folder /data/imagenet/val --image-size 256 --save-stats in256_val.npz   # the training crop
    dit-jax-eval --tfds imagenet2012 --split validation --image-size 256 --save-stats in256_val.npz

REF and SAMPLES are ADM .npz batches (arr_0 uint8 NHWC, optionally mu/sigma/mu_s/sigma_s) or folders of
images; every path (inputs, --save-stats, --json, --inception) may be local or a bucket URL (gs://...). The FID
Inception weights are pytorch-fid's pt_inception-2015-12-05 file, downloaded once into the cache and converted
(or --inception PATH); two statistics-only files give FID and sFID without them (the metrics that need images
read "not available" with the reason). Features are computed on every local device (and every host with
--distributed). Exit codes: 0 done, 1 an error (one line on stderr; --debug for the traceback), 2 a usage
error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import jax
import numpy as np

from convert.inception_weights import inception_params
from dit_jax.cli.common import check_local_dir, check_range, check_writable_file, log_line, run_command
from dit_jax.data import image_reader
from dit_jax.evaluation.batches import Batch, save_stats
from dit_jax.evaluation.evaluate import compute_stats, evaluate, format_results
from dit_jax.model import DTYPES, parse_dtype
from dit_jax.utils import paths
from dit_jax.utils.atomic import atomic_path
from dit_jax.utils.errors import ConfigError

PROG = "dit-jax-eval"


class ReaderImages:
    """A data reader of dit_jax.data (folder or tfds, the training crop) as an ImageSource for the extractor."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self.reader.read(i)["pixels"] for i in range(start, stop)])  # uint8 (n, S, S, 3)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("batches", nargs="*", metavar="REF SAMPLES",
                   help="REF and SAMPLES (.npz or folders); with --save-stats one batch (or none with --folder/--tfds)")
    p.add_argument("--inception", default=None,
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a converted .npz (default: download once)")
    p.add_argument("--batch-size", type=int, default=32, help="images per device per call (>= 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Inception compute dtype")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--save-stats", default=None, help="write mu, sigma, mu_s, sigma_s of one batch to this .npz")
    src = p.add_argument_group("a data set through dit_jax.data (with --save-stats)")
    src.add_argument("--folder", default=None, help="a folder of class sub-folders (DIR/<class>/<image>)")
    src.add_argument("--tfds", default=None, help="a tensorflow-datasets name, e.g. imagenet2012")
    src.add_argument("--split", default="train", help="tfds split")
    src.add_argument("--data-dir", default="", help="tfds data_dir")
    src.add_argument("--image-size", type=int, default=256, help="the training crop's size")
    p.add_argument("--cache-dir", default=None, help="download cache (default $DIT_JAX_CACHE or ~/.cache/dit_jax)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_range(args.batch_size, "--batch-size", 1)
    check_range(args.image_size, "--image-size", 8)
    check_local_dir(args.cache_dir, "--cache-dir")
    dataset = args.folder is not None or args.tfds is not None
    if args.folder is not None and args.tfds is not None:
        raise ConfigError("give --folder or --tfds, not both")
    if args.save_stats:
        if len(args.batches) + dataset != 1:
            raise ConfigError("--save-stats takes one batch: SAMPLES, --folder DIR or --tfds NAME")
        check_writable_file(args.save_stats, "--save-stats")
    elif dataset or len(args.batches) != 2:
        raise ConfigError(f"expected REF and SAMPLES (got {len(args.batches)} batch(es)); or one batch with "
                          f"--save-stats")
    if args.json:
        check_writable_file(args.json, "--json")
    if args.inception is not None and not paths.is_file(args.inception):  # checked even when not needed
        raise ConfigError(f"--inception {args.inception}: no such file")


def run(args) -> dict:
    check_args(args)
    if args.distributed:
        jax.distributed.initialize()

    def params():  # only when some batch has images: statistics alone need neither the network nor its weights
        return inception_params(args.inception, cache_dir=args.cache_dir, progress=not args.no_progress,
                                log=log_line)

    common = dict(per_device_batch=args.batch_size, dtype=parse_dtype(args.dtype), progress=not args.no_progress)
    if args.save_stats:
        if args.batches:
            source = args.batches[0]
        else:
            cfg = {"name": "folder" if args.folder is not None else "tfds", "folder": args.folder or "",
                   "tfds_name": args.tfds or "", "split": args.split, "data_dir": args.data_dir,
                   "image_size": args.image_size}
            reader = image_reader(cfg, jax.process_count())
            source = Batch(name=args.folder or f"{args.tfds}[{args.split}]", images=ReaderImages(reader), stats=None)
        stats = compute_stats(source, params, **common)
        if jax.process_index() == 0:
            save_stats(args.save_stats, stats)
        log_line(f"wrote {args.save_stats} (mu, sigma, mu_s, sigma_s)")
        return {"stats": args.save_stats}
    results = evaluate(args.batches[0], args.batches[1], params, log=log_line, **common)
    if jax.process_index() == 0:
        print(format_results(results), flush=True)
        if args.json:
            with atomic_path(args.json) as tmp, open(tmp, "w") as f:
                json.dump(results, f, indent=2)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: run(args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
