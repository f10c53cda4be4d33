"""Compile configs for TPU pods on this CPU and print the docs/tpu.md table (needs the `tpu` extra).

    JAX_PLATFORMS=cpu python -m benchmarks.pod_table                       # DiT-XL/2 256 + 512 px, 4 pods
    JAX_PLATFORMS=cpu python -m benchmarks.pod_table --configs configs/default.py:S/2 --pods v5e:16x16 \
        --set data.name=latents --out /tmp/rows.jsonl

Each row is `dit-jax-train --compile-only` (dit_jax.compile_report.compile_for_topology) for one config
and pod; rows are appended to --out as JSON lines as they finish, so a long run can be read as it goes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

GIB = 2**30
PODS = ("v5e:16x16", "v4:4x4x8", "v5p:4x4x4", "v6e:16x16")
CONFIGS = ("configs/default.py", "configs/default.py:XL/2,512")  # PATH[:VARIANT]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, sets):
    path, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path) if not os.path.isabs(path) else path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant) if variant else mod.get_config()
    for s in sets:
        key, value = s.split("=", 1)
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        old = node[leaf]
        if isinstance(old, bool):
            node[leaf] = value.lower() in ("1", "true", "yes")
        elif old is None:  # an unset field: an int if it reads as one
            node[leaf] = int(value) if value.lstrip("-").isdigit() else value
        else:
            node[leaf] = type(old)(value)
    return c


def row(r) -> str:
    m = r["mesh"]
    sub = f" ({'x'.join(map(str, m['fsdp_sub_axes']))})" if len(m["fsdp_sub_axes"]) > 1 else ""
    return (f"| {r['model']} | {r['image_size']} | {r['topology']} | {r['chips']} | data {m['data']} x fsdp "
            f"{m['fsdp']}{sub}{' x tensor ' + str(m['tensor']) if m['tensor'] > 1 else ''} | "
            f"{r['state_bytes_per_chip']['total'] / GIB:.2f} | {r['temp_bytes_per_chip'] / GIB:.2f} | "
            f"{r['total_bytes_per_chip'] / GIB:.2f} / {r['hbm_bytes_per_chip'] / GIB:.0f} | "
            f"{'yes' if r['fits'] else 'NO'} | {100 * r['replicated_state_fraction']:.2f}% | "
            f"{r['compile_seconds']:.0f} ({r['compile_cpu_seconds']:.0f}) |")


HEADER = ("| model | px | pod | chips | mesh | state GiB/chip | temp GiB/chip | total / HBM GiB | fits | replicated "
          "| compile s (CPU s) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--pods", nargs="*", default=list(PODS))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides like model.remat=True")
    ap.add_argument("--out", default="", help="append each report as a JSON line here")
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    from dit_jax import compile_report, topology

    print(HEADER, flush=True)
    bad = 0
    for path in args.configs:
        for pod in args.pods:
            cfg = load_config(path, args.set)
            r = compile_report.compile_for_topology(cfg, topology.tpu_topology(pod))
            r["config"], r["overrides"] = path, list(args.set)
            bad += not r["fits"]
            print(row(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r, default=str) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
