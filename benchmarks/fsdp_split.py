"""Which fsdp sizes split each DiT's state evenly: state per chip / the even split, from shapes alone.

    python -m benchmarks.fsdp_split                      # DiT-S/2, B/2, L/2, XL/2 x fsdp 2..640 (seconds)
    python -m benchmarks.fsdp_split --models DiT-L/2 --fsdp 96 256

No devices and no compile: dit_jax.analysis.state_split on an abstract mesh of each size, with configs/default.py's
sharding rules (fsdp_min_size 1024). A factor above 1.1 (marked) is what `dit-jax-train` warns about. The
patch size changes only the patch embedding and the final layer, so /4 and /8 behave like /2.
"""
from __future__ import annotations

import argparse
import sys

from dit_jax.training import build
from dit_jax.analysis import state_split
from dit_jax.model import abstract_params

MODELS = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2")
FSDP = (2, 4, 8, 16, 32, 64, 128, 256, 512, 6, 12, 24, 48, 96, 192, 384, 640)


def factors(models, sizes):
    """({(model, fsdp): split report}, {model: width})."""
    # ml_collections: the GPU machine has it only once benchmarks/gpu.sh installed it, so not at import time
    from dit_jax.cli.config_file import load_config

    out, widths = {}, {}
    for name in models:
        cfg = load_config(f"default:{name.split('-', 1)[1]}")  # as dit-jax-train --config default:L/2 reads it
        widths[name] = build.model_dims(cfg.model)["hidden_size"]
        params = abstract_params(build.build_model(cfg))
        for f in sizes:
            out[name, f] = state_split.split_for_sizes(params, f, cfg.sharding)
    return out, widths


def table(models, sizes, reps, widths) -> str:
    cell = lambda r: f"**{r['factor']:.2f}**" if r["uneven"] else f"{r['factor']:.2f}"  # noqa: E731
    lines = ["| fsdp | " + " | ".join(f"{m} (width {widths[m]})" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for f in sizes:
        lines.append(f"| {f} | " + " | ".join(cell(reps[m, f]) for m in models) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--fsdp", nargs="*", type=int, default=list(FSDP))
    ap.add_argument("--worst", action="store_true", help="also print the tensors of each uneven split")
    args = ap.parse_args(argv)
    reps, widths = factors(args.models, args.fsdp)
    print(table(args.models, args.fsdp, reps, widths))
    if args.worst:
        for (m, f), r in reps.items():
            if r["uneven"]:
                print(f"{m} fsdp={f}: {state_split.describe(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
