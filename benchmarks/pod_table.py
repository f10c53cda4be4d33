"""Compile configs for TPU pods on this CPU and print the docs/tpu.md tables (needs the `tpu` extra).

    JAX_PLATFORMS=cpu python -m benchmarks.pod_table --config.data.name=latents    # XL/2 256 + 512 px, 4 pods
    JAX_PLATFORMS=cpu python -m benchmarks.pod_table --configs configs/default.py --pods v5e:16x16 \
        --config.data.name=latents --config.model.dtype=bfloat16 --per-chip 1 4 16 --out /tmp/batch.jsonl
    python -m benchmarks.pod_table --from /tmp/batch.jsonl --table batch           # reprint, no compile

Each row is `dit-jax-train --compile-only --topology POD --config SPEC --config.FIELD=VALUE ...`
(dit_jax.compile_report.compile_for_topology) for one config and pod; every column comes from that report.
--configs takes what dit-jax-train's --config takes (PATH[:VARIANT] or a shipped name: digits, default:B/2),
and each --config.FIELD=VALUE applies to every one of them, read by the command's own loader
(benchmarks/config_args.py). Rows are appended to --out as JSON lines as they finish, so a long run can be
read as it goes, and --from prints the tables again from such a file. --per-chip N sets
the global batch to N examples per chip of each pod. Table "pods": memory, mesh, split and bytes moved;
table "batch": the same program at several batches per chip (memory, bytes moved, FLOPs, step-time bound).
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks import config_args

GIB = 2**30
PODS = ("v5e:16x16", "v4:4x4x8", "v5p:4x4x4", "v6e:16x16")
CONFIGS = ("configs/default.py", "configs/default.py:XL/2,512")  # as dit-jax-train's --config takes them
PROG = "benchmarks.pod_table"


def _mesh(r) -> str:
    m = r["mesh"]
    sub = f" ({'x'.join(map(str, m['fsdp_sub_axes']))})" if len(m["fsdp_sub_axes"]) > 1 else ""
    return (f"data {m['data']} x fsdp {m['fsdp']}{sub}" + (f" x tensor {m['tensor']}" if m["tensor"] > 1 else ""))


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / GIB:.2f}"


def remat_policy(r) -> str:
    """The report's remat policy; reports written before policies had only the flag (full remat or none)."""
    return r.get("remat_policy") or ("full" if r["remat"] else "none")


def row(r) -> str:
    """One line of the "pods" table."""
    if r["data_parallel_by_choice"]:
        split = "data-parallel by choice"
    else:
        split = f"{r['state_per_chip_vs_even_split']:.2f}x even, {100 * r['replicated_state_fraction']:.2f}% replicated"
    return (f"| {r['model']} | {r['image_size']} | {r['dtype']} | {remat_policy(r)} | {r['topology']} | "
            f"{r['chips']} | {r['global_batch_size']} | {_mesh(r)} | {_gib(r['state_bytes_per_chip']['total'])} | "
            f"{split} | {_gib(r['temp_bytes_per_chip'])} | {_gib(r['total_bytes_per_chip'])} / "
            f"{r['hbm_bytes_per_chip'] / GIB:.0f} | {'yes' if r['fits'] else 'NO'} | "
            f"{_gib(r['collective_bytes_moved_per_chip_per_step']) if r['compiled'] else 'n/a'} | "
            f"{r['compile_seconds']:.0f} ({r['compile_cpu_seconds']:.0f}) |")


HEADER = ("| model | px | dtype | remat policy | pod | chips | batch | mesh | state GiB/chip | state split | temp GiB/chip "
          "| total / HBM GiB | fits | collective GiB moved/chip/step | compile s (CPU s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def batch_row(r) -> str:
    """One line of the "batch" table: the per-chip cost of one step and a lower bound on its time."""
    fl, lb = r["flops"], r["step_time_lower_bound"]
    per_chip = r["global_batch_size"] // r["chips"]
    tf = lambda x: "n/a" if x is None else f"{x / 1e12:.2f}"  # noqa: E731
    ms = lambda x: "n/a" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    per_image = None if lb["seconds"] is None else lb["seconds"] / per_chip
    return (f"| {per_chip} | {r['global_batch_size']} | {_mesh(r)} | {_gib(r['total_bytes_per_chip'])} / "
            f"{r['hbm_bytes_per_chip'] / GIB:.0f} | {'yes' if r['fits'] else 'NO'} | "
            f"{_gib(r['collective_bytes_moved_per_chip_per_step']) if r['compiled'] else 'n/a'} | "
            f"{tf(fl['train_flops_per_chip'])} | {tf(fl['hlo_matmul_flops_per_chip'])} | "
            f"{tf(fl['xla_cost_analysis_flops_per_chip'])} | {ms(lb['compute_seconds'])} | {ms(lb['ici_seconds'])} | "
            f"{ms(per_image)} |")


BATCH_HEADER = ("| images/chip | global batch | mesh | total / HBM GiB | fits | collective GiB moved/chip/step "
                "| analytic TFLOP/chip | compiled matmul TFLOP/chip | XLA cost analysis TFLOP/chip (loop body once) "
                "| compute bound ms | ICI bound ms | bound ms per image/chip |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")
TABLES = {"pods": (HEADER, row), "batch": (BATCH_HEADER, batch_row)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS),
                    help="configs as dit-jax-train --config takes them: PATH[:VARIANT] or a shipped name")
    ap.add_argument("--pods", nargs="*", default=list(PODS))
    ap.add_argument("--per-chip", nargs="*", type=int, default=[],
                    help="global batch = N x the pod's chips, one row per N (default: the config's batch)")
    ap.add_argument("--table", choices=sorted(TABLES), default="pods")
    ap.add_argument("--out", default="", help="append each report as a JSON line here")
    ap.add_argument("--from", dest="from_file", default="", help="print the table from a --out file, no compile")
    args, overrides = config_args.parse_args(ap, argv)  # --config.FIELD=VALUE: for every config
    header, fmt = TABLES[args.table]
    if args.from_file:
        with open(args.from_file) as f:
            reports = [json.loads(line) for line in f if line.strip()]
        print(header)
        for r in reports:
            print(fmt(r))
        return 1 if any(not r["fits"] for r in reports) else 0
    import jax

    jax.config.update("jax_platforms", "cpu")
    from dit_jax import compile_report, topology

    # every config and override is read before the first (minutes-long) compile
    configs = [(spec, config_args.load(PROG, spec, overrides)) for spec in args.configs]
    print(header, flush=True)
    bad = 0
    for spec, config in configs:
        for pod in args.pods:
            topo = topology.tpu_topology(pod)
            for n in args.per_chip or [None]:
                cfg = config.copy_and_resolve_references()
                if n is not None:
                    cfg.global_batch_size = n * topo.chips
                r = compile_report.compile_for_topology(cfg, topo)
                r["config"], r["overrides"] = spec, overrides
                bad += not r["fits"]
                print(fmt(r), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r, default=str) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
