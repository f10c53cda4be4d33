"""Which attention pays on TPU: the real training step compiled for a pod (libtpu, compile-only) per kernel.

    JAX_PLATFORMS=cpu python -m benchmarks.attention_tpu                      # DiT-XL/2, 256 and 512 px, v5e:16x16
    JAX_PLATFORMS=cpu python -m benchmarks.attention_tpu --variants S/2,512 --topology v5e:2x2 --batch 8 --depth 2

For each config variant (configs/default.py's, read as `dit-jax-train --config default:VARIANT` reads it, with
--batch, --depth and any --config.FIELD=VALUE as its overrides) and attention_impl ("pallas_tpu", "xla",
"matmul"): `train.setup` + `train.jit_train_step` as `dit-jax-train --compile-only` builds them (latent
batches, the variant's dtype and remat), compiled for the topology; printed per chip: XLA's temporaries and
total bytes (memory analysis) and XLA's cost analysis of the compiled program (bytes accessed: HBM traffic as
XLA estimates it; a Pallas kernel counts its operands and results only, which is the point of it). No TPU runs
anything, so there is no time.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import config_args
from dit_jax import compile_report, topology, train

GIB = 2**30
PROG = "benchmarks.attention_tpu"


def compile_one(variant: str, impl: str, topo, overrides=()) -> dict:
    c = config_args.load(PROG, f"default:{variant}", ["--config.data.name=latents",
                                                      f"--config.model.attention_impl={impl}", *overrides])
    env = train.setup(c, devices=topo.devices, process_count=topo.hosts)
    compiled, refusal, (_, cpu_s) = compile_report.compile_step(train.jit_train_step(c, env),
                                                                compile_report.abstract_step_args(c, env), env.mesh)
    out = {"variant": variant, "attention_impl": impl, "tokens": (env.model.input_size // env.model.patch_size) ** 2,
           "batch_per_chip": int(c.global_batch_size) // topo.chips, "compile_cpu_s": cpu_s}
    if compiled is None:
        out.update(fits=False, temp_gib=refusal["temp_bytes"] / GIB)
        return out
    xla = compile_report.xla_bytes(compiled, None, 0)
    accessed = float(compile_report.cost_analysis(compiled).get("bytes accessed", float("nan")))
    out.update(temp_gib=xla["temp"] / GIB, total_gib=compile_report.total_bytes(xla) / GIB,
               bytes_accessed_gib=accessed / GIB,
               pallas_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["XL/2,512", "XL/2"], help="configs/default.py variants")
    ap.add_argument("--impls", nargs="+", default=["pallas_tpu", "xla", "matmul"])
    ap.add_argument("--topology", default="v5e:16x16")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the config's 256)")
    ap.add_argument("--depth", type=int, default=None)
    args, overrides = config_args.parse_args(ap, argv)  # and any --config.FIELD=VALUE
    overrides = ([f"--config.global_batch_size={args.batch}"] if args.batch else []) + (
        [f"--config.model.depth={args.depth}"] if args.depth else []) + overrides
    topo = topology.tpu_topology(args.topology)
    rows = []
    for variant in args.variants:
        for impl in args.impls:
            r = compile_one(variant, impl, topo, overrides)
            rows.append(r)
            print(f"{variant:9s} {r['tokens']:5d} tokens, {r['batch_per_chip']} ex/chip  {impl:10s} temp "
                  f"{r['temp_gib']:.3f} GiB  total {r.get('total_gib', float('nan')):.3f} GiB  bytes accessed "
                  f"{r.get('bytes_accessed_gib', float('nan')):.1f} GiB  Pallas kernels {r.get('pallas_kernels', 0)}"
                  f"  ({r['compile_cpu_s']:.0f} CPU s)", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
