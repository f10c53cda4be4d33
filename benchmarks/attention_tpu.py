"""Which attention pays on TPU: the real training step compiled for a pod (libtpu, compile-only) per kernel.

    JAX_PLATFORMS=cpu python -m benchmarks.attention_tpu                      # DiT-XL/2, 256 and 512 px, v5e:16x16
    JAX_PLATFORMS=cpu python -m benchmarks.attention_tpu --variants S/2,512 --topology v5e:2x2 --batch 8 --depth 2

For each config variant and attention_impl ("pallas_tpu", "xla", "matmul"): `train.setup` +
`train.jit_train_step` as `dit-jax-train --compile-only` builds them (latent batches, the variant's dtype and
remat), compiled for the topology; printed per chip: XLA's temporaries and total bytes (memory analysis) and
XLA's cost analysis of the compiled program (bytes accessed: HBM traffic as XLA estimates it; a Pallas kernel
counts its operands and results only, which is the point of it). No TPU runs anything, so there is no time.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from dit_jax import compile_report, topology, train
from dit_jax import sharding as shd

GIB = 2**30


def compile_one(variant: str, impl: str, topo, batch=None, depth=None) -> dict:
    from configs import default  # ml_collections

    c = default.get_config(variant)
    c.data.name, c.model.attention_impl = "latents", impl
    if batch:
        c.global_batch_size = batch
    if depth:
        c.model.depth = depth
    env = train.setup(c, devices=topo.devices, process_count=topo.hosts)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   env.abstract_state, env.state_shardings)
    batch_in = compile_report.abstract_batch(c, env.model, env.batch_kind, env.mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(env.mesh))
    t0 = time.process_time()
    compiled, refusal, _ = compile_report.compile_step(train.jit_train_step(c, env), (state, batch_in, rng, None),
                                                       env.mesh)
    out = {"variant": variant, "attention_impl": impl, "tokens": (env.model.input_size // env.model.patch_size) ** 2,
           "batch_per_chip": int(c.global_batch_size) // topo.chips, "compile_cpu_s": time.process_time() - t0}
    if compiled is None:
        out.update(fits=False, temp_gib=refusal["temp_bytes"] / GIB)
        return out
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    out.update(temp_gib=mem.temp_size_in_bytes / GIB,
               total_gib=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes) / GIB,
               bytes_accessed_gib=float(cost.get("bytes accessed", float("nan"))) / GIB,
               pallas_kernels=text.count('custom_call_target="tpu_custom_call"'))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["XL/2,512", "XL/2"], help="configs/default.py variants")
    ap.add_argument("--impls", nargs="+", default=["pallas_tpu", "xla", "matmul"])
    ap.add_argument("--topology", default="v5e:16x16")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the config's 256)")
    ap.add_argument("--depth", type=int, default=None)
    args = ap.parse_args(argv)
    topo = topology.tpu_topology(args.topology)
    rows = []
    for variant in args.variants:
        for impl in args.impls:
            r = compile_one(variant, impl, topo, args.batch, args.depth)
            rows.append(r)
            print(f"{variant:9s} {r['tokens']:5d} tokens, {r['batch_per_chip']} ex/chip  {impl:10s} temp "
                  f"{r['temp_gib']:.3f} GiB  total {r.get('total_gib', float('nan')):.3f} GiB  bytes accessed "
                  f"{r.get('bytes_accessed_gib', float('nan')):.1f} GiB  Pallas kernels {r.get('pallas_kernels', 0)}"
                  f"  ({r['compile_cpu_s']:.0f} CPU s)", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
