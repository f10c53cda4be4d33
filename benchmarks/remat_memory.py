"""Activation memory per remat policy, from the real `dit-jax-train --compile-only` (docs/performance.md,
"Activation memory and remat policies"; issue 21's measurement):

    flock /tmp/dit-heavy.lock python -m benchmarks.remat_memory                      # XL/2, 256 and 512 px
    python -m benchmarks.remat_memory --resolutions 256 --policies save_dots --batches 16 64

For each resolution and policy, DiT-XL/2 in bfloat16 on latent batches is compiled for v5p:2x2x1 with mesh
data 4 x fsdp 1 at two global batches. Printed per row: temporaries and total per chip at each batch, the
slope (temporaries per image per chip: the difference over the difference of the per-chip batches) and the
batch-independent temporaries (the line through both points at zero images), next to the float32 gradients,
and mesh_plan's estimate of the totals (computed here, in-process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

GIB = 2**30
POLICIES = ("none", "save_dots", "save_dots_except_fc1", "save_qkv_proj", "full")


def command(resolution: int, policy: str, batch: int, workdir: str, topology: str, model: str,
            depth=None) -> list:
    cfg = f"configs/default.py:{model}" + (",512" if resolution == 512 else "")
    return ["dit-jax-train", f"--config={cfg}", f"--workdir={workdir}", "--compile-only", f"--topology={topology}",
            "--config.data.name=latents", "--config.model.dtype=bfloat16", f"--config.model.remat_policy={policy}",
            "--config.mesh.data=4", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
            f"--config.global_batch_size={batch}"] + ([f"--config.model.depth={depth}"] if depth else [])


def compile_report(resolution, policy, batch, topology, model, depth=None) -> dict:
    with tempfile.TemporaryDirectory() as wd:
        cmd = command(resolution, policy, batch, wd, topology, model, depth)
        r = subprocess.run(cmd, capture_output=True, text=True)
        path = os.path.join(wd, "compile_report.json")
        if not os.path.exists(path):
            raise SystemExit(f"remat_memory: error: {' '.join(cmd)} wrote no report: {r.stderr.strip()[-500:]}")
        with open(path) as f:
            return json.load(f)


def estimate(resolution, policy, batch, topology, model, depth=None) -> int:
    """mesh_plan's estimate of the same run's bytes per chip (what an auto mesh is chosen by)."""
    from configs import default
    from dit_jax import mesh_plan
    from dit_jax.training import build
    from dit_jax import sharding as shd
    from dit_jax import topology as topo_lib
    from dit_jax.model import abstract_params

    c = default.get_config(model + (",512" if resolution == 512 else ""))
    c.data.name, c.model.dtype, c.model.remat_policy, c.global_batch_size = "latents", "bfloat16", policy, batch
    if depth:
        c.model.depth = depth
    m = build.build_model(c, "tpu")
    mesh = shd.make_mesh((4, 1, 1), topo_lib.tpu_topology(topology).devices[:4])
    return mesh_plan.estimate_bytes(c, m, abstract_params(m), mesh, batch, False)["total"]


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="XL/2")
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--batches", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--depth", type=int, help="fewer blocks than the model's (a quick look; not the targets)")
    args = ap.parse_args(argv)
    chips = 4  # data 4
    rows = []
    print("| px | policy | temp GiB/chip (b%d / b%d) | total GiB/chip (b%d / b%d) | activations GiB/image/chip | "
          "batch-independent temp GiB | f32 grads GiB | mesh_plan estimate GiB/chip |" % (*args.batches, *args.batches))
    print("|---|---|---|---|---|---|---|---|")
    for res in args.resolutions:
        for policy in args.policies:
            reps = [compile_report(res, policy, b, args.topology, args.model, args.depth) for b in args.batches]
            temp = [r["temp_bytes_per_chip"] for r in reps]
            total = [r["total_bytes_per_chip"] for r in reps]
            per_chip = [b / chips for b in args.batches]
            slope = (temp[1] - temp[0]) / (per_chip[1] - per_chip[0])
            fixed = temp[0] - slope * per_chip[0]
            grads = reps[0]["state_bytes_per_chip"]["params"]  # float32, as large as the parameters
            est = [estimate(res, policy, b, args.topology, args.model, args.depth) for b in args.batches]
            row = dict(resolution=res, policy=policy, temp=temp, total=total, slope=slope, fixed=fixed, grads=grads,
                       estimate=est)
            rows.append(row)
            print(f"| {res} | {policy} | {temp[0] / GIB:.2f} / {temp[1] / GIB:.2f} | {total[0] / GIB:.2f} / "
                  f"{total[1] / GIB:.2f} | {slope / GIB:.3f} | {fixed / GIB:.2f} | {grads / GIB:.2f} | "
                  f"{est[0] / GIB:.2f} / {est[1] / GIB:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
