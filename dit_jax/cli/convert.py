"""`dit-jax-convert` (also `python -m dit_jax.cli.convert`): DiT weights between PyTorch formats and dit_jax.

    dit-jax-convert to-flax DiT-XL-2-256x256.pt out/DiT-XL-2-256
    dit-jax-convert to-torch out/DiT-XL-2-256 DiT-XL-2-256x256.pt
    dit-jax-convert to-torch out/DiT-XL-2-256 out/dit-xl-diffusers --format diffusers
    dit-jax-convert migrate old/DiT-XL-2-256 out/DiT-XL-2-256     # a directory of an older dit_jax

IN and OUT may be local paths or bucket URLs (gs://...). Progress goes to stderr, the inferred configuration
to stdout. Any error prints one line and exits 1 (the
traceback with --debug; 2 for a usage error, 130 on Ctrl-C); outputs are written atomically, so nothing is
left at OUT after a failure (a folder on a bucket that a kill interrupted stays marked incomplete, and is
refused until it is written again with --overwrite). Release weights written as a diffusers folder, or weights
read from diffusers written in a release format, print one line `dit-jax-convert: warning: ...`: the two models
compute their timestep features differently, and the line says by how much (docs/convert.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from convert import writers
from convert.api import flax_to_torch, load_torch_checkpoint
from dit_jax.cli.common import one_line_warnings, run_command
from dit_jax.pretrained import PretrainedError, is_pretrained_dir, load_pretrained, model_config, save_pretrained
from dit_jax.utils.atomic import check_target

PROG = "dit-jax-convert"


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _describe(cfg) -> str:
    name = writers.model_name(cfg) or "DiT"
    return f"{name} " + json.dumps({k: v for k, v in cfg.items()}, sort_keys=False)


def to_flax(args: argparse.Namespace) -> None:
    check_target(args.output, args.overwrite)  # fail before the (slow) read
    params, cfg = load_torch_checkpoint(args.input, use_model=args.use_model, num_heads=args.num_heads,
                                        input_size=args.input_size, num_classes=args.num_classes,
                                        allow_pickle=args.unsafe_pickle, log=_log)
    print(_describe(cfg), flush=True)
    _log(f"writing {args.output} (orbax params + config.json)")
    save_pretrained(params, cfg, args.output, overwrite=args.overwrite)


def to_torch(args: argparse.Namespace) -> None:
    fmt = args.format or writers.guess_format(args.output)
    check_target(args.output, args.overwrite)  # fail before the (slow) read
    if is_pretrained_dir(args.input):
        _log(f"reading {args.input} (dit_jax directory)")
        model, params = load_pretrained(args.input)
        cfg = model_config(model)
    else:  # any PyTorch format -> another one (e.g. .pt -> diffusers)
        params, cfg = load_torch_checkpoint(args.input, use_model=args.use_model, num_heads=args.num_heads,
                                            input_size=args.input_size, num_classes=args.num_classes,
                                            allow_pickle=args.unsafe_pickle, log=_log)
    print(_describe(cfg), flush=True)
    state = flax_to_torch(params, cfg, as_numpy=True)
    _log(f"converting {len(state)} tensors; writing {args.output} ({fmt})")
    writers.write(state, cfg, args.output, fmt, overwrite=args.overwrite)


def migrate(args: argparse.Namespace) -> None:
    """A dit_jax directory with the older per-block parameters (blocks_0 ...) -> the stacked layout."""
    check_target(args.output, args.overwrite)
    if not is_pretrained_dir(args.input):
        raise PretrainedError(f"{args.input}: not a dit_jax directory (config.json + params/)")
    _log(f"reading {args.input} (dit_jax directory)")
    model, params = load_pretrained(args.input)  # stacks older per-block parameters
    cfg = model_config(model)
    print(_describe(cfg), flush=True)
    _log(f"writing {args.output} (stacked blocks)")
    save_pretrained(params, cfg, args.output, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert DiT weights between PyTorch and dit_jax (Flax).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--use-model", action="store_true",
                        help='train.py checkpoints: take the raw "model" weights instead of "ema"')
        sp.add_argument("--num-heads", type=int, help="attention heads (only needed for non-standard widths)")
        sp.add_argument("--input-size", type=int, help="latent size (only needed when the file has no pos_embed)")
        sp.add_argument("--num-classes", type=int,
                        help="classes (default: label-table rows - 1, i.e. a null class for guidance)")
        sp.add_argument("--unsafe-pickle", action="store_true",
                        help="load pickles with torch.load(weights_only=False); a pickle can run code, "
                             "use only for files you trust")
        sp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        sp.add_argument("--debug", action="store_true", help="print the traceback of an error")

    f = sub.add_parser("to-flax", help="PyTorch checkpoint -> dit_jax directory (orbax params + config.json)")
    f.add_argument("input", metavar="IN", help=".pt/.pth/.bin, .safetensors, or a diffusers folder")
    f.add_argument("output", metavar="OUT", help="directory to create")
    common(f)

    t = sub.add_parser("to-torch", help="dit_jax directory (or any PyTorch format) -> PyTorch format")
    t.add_argument("input", metavar="IN", help="dit_jax directory, or a PyTorch checkpoint to re-encode")
    t.add_argument("output", metavar="OUT", help="file (.pt, .safetensors) or directory (diffusers)")
    t.add_argument("--format", choices=("pt", "train", "safetensors", "diffusers"),
                   help="output format (default: from OUT's suffix; no suffix -> diffusers)")
    common(t)

    m = sub.add_parser("migrate", help="dit_jax directory of an older version (parameters blocks_0 ...) -> "
                                       "the current layout (stacked blocks); loading converts on the fly too")
    m.add_argument("input", metavar="IN", help="dit_jax directory")
    m.add_argument("output", metavar="OUT", help="directory to create (IN itself with --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p


COMMANDS = {"to-flax": to_flax, "to-torch": to_torch, "migrate": migrate}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()

    def convert_command():
        COMMANDS[args.command](args)
        _log(f"done in {time.time() - start:.1f} s")

    with one_line_warnings(PROG):  # e.g. weights written to a format whose model computes differently
        return run_command(PROG, convert_command, argv, on_interrupt=lambda: "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
