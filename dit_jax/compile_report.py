"""`dit-jax-train --compile-only --topology v5e:16x16`: compile the real training step for a TPU pod here.

The same `train.setup` (mesh, shardings), `train.make_train_step` and `train.jit_train_step` as a real run,
lowered with abstract state and batch (ShapeDtypeStructs carrying the run's shardings) for the compile-only
devices of a TPU topology (dit_jax.topology) and compiled by libtpu. Nothing is read and no device memory
is allocated. The report (printed, and written to WORKDIR/compile_report.json) holds what XLA says one chip
needs, the state split by kind, how much of the state is replicated, the collectives in the compiled
program and the analytic FLOPs of a step; the exit status is 0 when it fits, 1 when it does not.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import mesh_plan
from dit_jax import sharding as shd
from dit_jax import topology as topo_lib
from dit_jax import train
from dit_jax.atomic import atomic_path

GIB = 2**30
REPORT_NAME = "compile_report.json"


# ----------------------------------------------------------------------------------------------------
# Abstract inputs
# ----------------------------------------------------------------------------------------------------
def abstract_batch(config, model, kind: str, mesh) -> Dict[str, jax.ShapeDtypeStruct]:
    """The global batch a real run feeds the step, as ShapeDtypeStructs sharded over the batch axes."""
    b, s, c = int(config.global_batch_size), model.input_size, model.in_channels
    sh = shd.batch_sharding(mesh)
    f32 = lambda shape: jax.ShapeDtypeStruct((b,) + shape, jnp.float32, sharding=sh)  # noqa: E731
    out = {"y": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh)}
    if kind == "x":
        out["x"] = f32((s, s, c))
    elif kind == "latent":
        out["latent_mean"], out["latent_std"] = f32((s, s, c)), f32((s, s, c))
    else:
        out["image"] = f32((8 * s, 8 * s, 3))
    return out


def abstract_vae(mesh):
    """(AutoencoderKL, replicated abstract params) of the default VAE (what load_vae returns, not loaded)."""
    from dit_jax.vae import AutoencoderKL

    vae = AutoencoderKL()
    params = jax.eval_shape(lambda r: vae.init(r, jnp.zeros((1, 64, 64, 3), jnp.float32))["params"],
                            jax.random.PRNGKey(0))
    rep = shd.replicated(mesh)
    return vae, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


# ----------------------------------------------------------------------------------------------------
# State accounting (from the shardings, independent of XLA)
# ----------------------------------------------------------------------------------------------------
def state_accounting(abstract_state, state_sh, chips: int) -> Dict[str, Any]:
    """Bytes per chip and in total of params / EMA / optimizer, and the fully replicated tensors."""
    per_chip: Dict[str, int] = {}
    total: Dict[str, int] = {}
    replicated: List[Tuple[int, str, Tuple[int, ...]]] = []
    groups = {"params": "params", "ema_params": "ema", "opt_state": "optimizer", "step": "optimizer"}
    for key, group in groups.items():
        leaves = jax.tree_util.tree_flatten_with_path(abstract_state[key])[0]
        shardings = jax.tree_util.tree_leaves(state_sh[key])
        for (path, x), s in zip(leaves, shardings):
            nb = _nbytes(x)
            per_chip[group] = per_chip.get(group, 0) + shd.shard_bytes(x, s)
            total[group] = total.get(group, 0) + nb
            if s.is_fully_replicated and chips > 1:
                name = "/".join(p for p in (key, shd.path_str(path)) if p)
                replicated.append((nb, name, tuple(x.shape)))
    per_chip["total"], total["total"] = sum(per_chip.values()), sum(total.values())
    replicated.sort(reverse=True)
    rep_bytes = sum(r[0] for r in replicated)
    return {"per_chip": per_chip, "total": total, "replicated_bytes": rep_bytes,
            "replicated_fraction": rep_bytes / max(total["total"], 1),
            "largest_replicated": [{"name": n, "shape": list(sh), "bytes": b} for b, n, sh in replicated[:10]]}


# ----------------------------------------------------------------------------------------------------
# Collectives in the compiled HLO
# ----------------------------------------------------------------------------------------------------
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONST = re.compile(r"=\s*[su]32\[\]\S*\s+constant\((\d+)\)")
_CALLEES = re.compile(r"(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _array_bytes(shape_text: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(shape_text):
        size = _DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4)
        n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
        total += int(n * size)
    return total


def _tuple_elements(shape_text: str) -> List[str]:
    """Top-level elements of a tuple shape "(a, (b, c), d)"; a non-tuple is one element."""
    t = shape_text.strip()
    if not t.startswith("("):
        return [t]
    parts, depth, cur = [], 0, ""
    for ch in t[1:-1]:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    return parts + [cur]


def _collective_bytes(shape_text: str, op: str) -> int:
    """Bytes a collective produces: its result arrays; async starts of all-gather / collective-permute
    return (operands, results, ...) and count their results only."""
    if op in ("all-gather-start", "collective-permute-start"):
        elems = _tuple_elements(shape_text)
        if len(elems) >= 2:
            return _array_bytes(elems[1])
    return _array_bytes(shape_text)


def _split_instruction(line: str) -> Optional[Tuple[str, str, str]]:
    """'%x = SHAPE opcode(operands), attrs' -> (shape text, opcode, rest) or None."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = rest.split("(", 1)[0].strip()
    return shape, op, rest


def _trip_from_condition(comps: Dict[str, List[str]], m) -> int:
    """Trip count of a counted loop (a scan: counter from 0, `counter < N`): the integer constant its
    condition compares with; 1 when that is not what the condition looks like."""
    lines = comps.get(m.group(1), []) if m else []
    consts = [int(c.group(1)) for c in map(_INT_CONST.search, lines) if c]
    if len(consts) == 1 and any("direction=LT" in line for line in lines):
        return max(consts[0], 1)
    return 1


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
    """{kind: {count, bytes, count_per_step, bytes_per_step}} of the compiled program.

    count/bytes: collective instructions as written (an async pair counts once); *_per_step multiplies
    those inside loops (the scan over blocks, gradient accumulation) by the loops' trip counts (XLA's
    known_trip_count, else the constant a counted loop's condition compares with).
    bytes: the arrays the instruction produces (the gathered / reduced / permuted buffers)."""
    comps: Dict[str, List[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    # Multiplier of every computation: how often it runs per step.
    mult: Dict[str, int] = {}

    def visit(name: str, k: int, seen: Tuple[str, ...]) -> None:
        if name not in comps or name in seen:
            return
        mult[name] = mult.get(name, 0) + k
        for line in comps[name]:
            parts = _split_instruction(line)
            if parts is None:
                continue
            _, op, rest = parts
            trip = 1
            if op == "while":
                t = _TRIP.search(rest)
                trip = int(t.group(1)) if t else _trip_from_condition(comps, _CONDITION.search(rest))
            callees = _CALLEES.findall(rest)
            for b in _BRANCHES.findall(rest):
                callees += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
            for c in callees:
                is_body = op == "while" and f"body=%{c}" in rest or f"body={c}" in rest
                visit(c, k * (trip if is_body else 1), seen + (name,))

    if entry is not None:
        visit(entry, 1, ())
    out: Dict[str, Dict[str, int]] = {}
    for name, lines in comps.items():
        k = mult.get(name, 0)
        for line in lines:
            parts = _split_instruction(line)
            if parts is None:
                continue
            shape, op, _ = parts
            kind = op[:-6] if op.endswith("-start") else op
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            nb = _collective_bytes(shape, op)
            r = out.setdefault(kind, {"count": 0, "bytes": 0, "count_per_step": 0, "bytes_per_step": 0})
            r["count"] += 1
            r["bytes"] += nb
            r["count_per_step"] += k
            r["bytes_per_step"] += k * nb
    return out


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------
def forward_macs(model) -> Dict[str, int]:
    """Multiply-adds of one forward pass of one example (the DiT paper's "Gflops"), split blocks / other."""
    p, d, depth = model.patch_size, model.hidden_size, model.depth
    t = (model.input_size // p) ** 2
    mlp = int(d * model.mlp_ratio)
    block = d * 6 * d + t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * mlp
    other = (t * p * p * model.in_channels * d  # patch embedding
             + 256 * d + d * d  # timestep MLP
             + d * 2 * d + t * d * p * p * model.out_channels)  # final layer
    return {"blocks": depth * block, "other": other, "total": depth * block + other}


def training_flops(config, model, vae=None, vae_params=None) -> Dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one optimizer step: forward + backward (2x forward) + the
    rematerialised block forwards, for the global batch; plus the VAE encoder for image batches."""
    macs = forward_macs(model)
    per_example = 2 * (3 * macs["total"] + (macs["blocks"] if config.model.remat else 0))
    b = int(config.global_batch_size)
    out = {"forward_macs_per_example": macs["total"], "dit_flops_per_step": per_example * b}
    vae_flops = 0.0
    if vae is not None:  # XLA's count for one image (no loops in the encoder), times the batch
        s = 8 * model.input_size
        x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
        lowered = jax.jit(lambda prm, img: vae.apply({"params": prm}, img, method=type(vae).encode)).lower(
            jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), vae_params), x)
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        vae_flops = float(cost.get("flops", 0.0)) * b
    out["vae_encoder_flops_per_step"] = vae_flops
    out["train_flops_per_step"] = out["dit_flops_per_step"] + vae_flops
    return out


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
def compile_for_topology(config, topo: topo_lib.Topology, workdir: str = "") -> Dict[str, Any]:
    """Compile the training step of `config` for `topo`; returns the report (see the module docstring)."""
    notes = []
    config = config.copy_and_resolve_references()
    if int(config.mesh.get("num_devices", 0) or 0):
        notes.append(f"config.mesh.num_devices={config.mesh.num_devices} ignored: a pod run uses all "
                     f"{topo.chips} chips")
        with config.unlocked():
            config.mesh.num_devices = 0
    env = train.setup(config, workdir, devices=topo.devices, process_count=topo.hosts)
    mesh, model, tx, st_sh = env["mesh"], env["model"], env["tx"], env["state_shardings"]
    plan: mesh_plan.MeshPlan = env["mesh_plan"]
    kind = train.config_batch_kind(config)
    vae, vae_params = abstract_vae(mesh) if kind == "image" else (None, None)
    step = train.jit_train_step(train.make_train_step(config, model, tx, env["diffusion"], vae), mesh, st_sh)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   env["abstract_state"], st_sh)
    batch = abstract_batch(config, model, kind, mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
    t0, c0 = time.time(), time.process_time()
    with mesh:
        compiled = step.lower(state, batch, rng, vae_params).compile()
    compile_seconds, compile_cpu_seconds = time.time() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    xla = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] + xla["generated_code"]
    acct = state_accounting(env["abstract_state"], st_sh, topo.chips)
    batch_bytes = sum(shd.shard_bytes(x, x.sharding) for x in batch.values())
    vae_bytes = sum(shd.shard_bytes(x, x.sharding) for x in jax.tree_util.tree_leaves(vae_params)) if vae else 0
    budget = (1 - mesh_plan.HEADROOM) * topo.hbm_bytes
    fits = total <= budget
    flops = training_flops(config, model, vae, vae_params)
    flops["train_flops_per_chip"] = flops["train_flops_per_step"] / topo.chips
    flops["seconds_per_step_at_peak"] = flops["train_flops_per_chip"] / (topo.peak_bf16_tflops * 1e12)
    ideal = acct["total"]["total"] / topo.chips
    report = {
        "topology": topo.name, "generation": topo.generation, "chips": topo.chips, "hosts": topo.hosts,
        "devices_per_chip": 1, "tensorcores_per_chip": topo.tensorcores_per_chip, "megacore": topo.megacore,
        "model": config.model.name, "image_size": 8 * model.input_size if kind != "x" else model.input_size,
        "global_batch_size": int(config.global_batch_size), "grad_accum_steps": int(config.grad_accum_steps),
        "dtype": config.model.dtype, "remat": bool(config.model.remat), "batch_kind": kind,
        "mesh": plan.as_dict(), "mesh_axes": dict(mesh.shape),
        "hbm_bytes_per_chip": topo.hbm_bytes, "hbm_source": topo.hbm_source,
        "state_bytes_per_chip": acct["per_chip"], "state_bytes_total": acct["total"],
        "state_per_chip_vs_ideal": acct["per_chip"]["total"] / ideal,
        "batch_bytes_per_chip": batch_bytes, "vae_bytes_per_chip": vae_bytes,
        "temp_bytes_per_chip": xla["temp"], "total_bytes_per_chip": total, "xla_memory_analysis": xla,
        "estimated_bytes_per_chip": plan.estimate,
        "fits": fits, "headroom": mesh_plan.HEADROOM, "budget_bytes_per_chip": int(budget),
        "replicated_state_fraction": acct["replicated_fraction"],
        "largest_replicated": acct["largest_replicated"],
        "collectives": collectives(compiled.as_text()),
        "compile_seconds": round(compile_seconds, 2), "compile_cpu_seconds": round(compile_cpu_seconds, 2),
        "flops": flops, "notes": notes,
    }
    if not fits:
        report["suggestions"] = suggestions(config, report, env)
    return report


def suggestions(config, report: Dict[str, Any], env) -> List[str]:
    """Concrete flag changes that lower the bytes per chip, the biggest lever first."""
    out = []
    mesh = report["mesh"]
    dp = mesh["data"] * mesh["fsdp"]
    state = report["state_bytes_per_chip"]["total"]
    if mesh["fsdp"] < dp and state > 0.1 * report["budget_bytes_per_chip"]:
        f = dp
        out.append(f"shard the state over more chips: --config.mesh.fsdp={f} --config.mesh.data={dp // f} "
                   f"(state {state / GIB:.2f} GiB per chip now, ~{state * mesh['fsdp'] / f / GIB:.2f} GiB then)")
    if not report["remat"]:
        out.append("rematerialise the blocks: --config.model.remat=True (keeps only each block's input for the "
                   f"backward pass; temporaries are {report['temp_bytes_per_chip'] / GIB:.2f} GiB per chip now)")
    if report["dtype"] == "float32":
        out.append("compute in bfloat16: --config.model.dtype=bfloat16 (parameters stay float32)")
    micro = report["global_batch_size"] // report["grad_accum_steps"]
    for a in (2, 4, 8):
        m = micro // a
        if micro % a == 0 and m % dp == 0:
            out.append(f"micro-batches: --config.grad_accum_steps={report['grad_accum_steps'] * a} "
                       f"({m // dp} examples per chip per micro-batch instead of {micro // dp})")
            break
    if not out:
        out.append("use a generation with more HBM per chip or a larger slice")
    return out


def format_report(r: Dict[str, Any]) -> str:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    m = r["mesh"]
    sub = f" (fsdp sub-axes {'x'.join(map(str, m['fsdp_sub_axes']))})" if len(m["fsdp_sub_axes"]) > 1 else ""
    st = r["state_bytes_per_chip"]
    lines = [
        f"{r['model']} {r['image_size']} px, batch {r['global_batch_size']} ({r['batch_kind']}), {r['dtype']}"
        f"{', remat' if r['remat'] else ''} on {r['topology']}: {r['chips']} chips, {r['hosts']} hosts",
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}{sub}; {m['reason']}",
        f"per chip: state {g(st['total'])} (params {g(st['params'])}, EMA {g(st['ema'])}, optimizer "
        f"{g(st['optimizer'])}; {r['state_per_chip_vs_ideal']:.2f}x the even split), batch {g(r['batch_bytes_per_chip'])}"
        + (f", VAE {g(r['vae_bytes_per_chip'])}" if r["vae_bytes_per_chip"] else "")
        + f", temporaries {g(r['temp_bytes_per_chip'])}, total {g(r['total_bytes_per_chip'])} of "
          f"{g(r['hbm_bytes_per_chip'])} HBM",
        f"replicated state {100 * r['replicated_state_fraction']:.3f}% of {g(r['state_bytes_total']['total'])}; "
        f"collectives per step: " + ", ".join(f"{k} {v['count_per_step']}x ({g(v['bytes_per_step'])})"
                                              for k, v in sorted(r["collectives"].items())),
        f"{r['flops']['train_flops_per_chip'] / 1e12:.1f} TFLOP per chip per step "
        f"(>= {r['flops']['seconds_per_step_at_peak'] * 1e3:.0f} ms at peak); lowered and compiled in "
        f"{r['compile_seconds']:.1f} s ({r['compile_cpu_seconds']:.0f} CPU s)",
    ]
    lines += [f"note: {n}" for n in r["notes"]]
    if r["fits"]:
        lines.append(f"FITS: {g(r['total_bytes_per_chip'])} <= {100 * (1 - r['headroom']):.0f}% of "
                     f"{g(r['hbm_bytes_per_chip'])}")
    else:
        lines.append(f"DOES NOT FIT: {g(r['total_bytes_per_chip'])} > {100 * (1 - r['headroom']):.0f}% of "
                     f"{g(r['hbm_bytes_per_chip'])}; try:")
        lines += [f"  {s}" for s in r["suggestions"]]
    return "\n".join(lines)


def main(config, workdir: str, topology_name: Optional[str]) -> int:
    """The --compile-only command: report, write WORKDIR/compile_report.json, 0 if it fits else 1."""
    jax.config.update("jax_platforms", "cpu")  # compile only: never initialise an accelerator here
    if not topology_name:
        print("error: --compile-only needs --topology (e.g. --topology v5e:16x16)", file=sys.stderr)
        return 1
    try:
        topo = topo_lib.tpu_topology(topology_name)
        report = compile_for_topology(config, topo, workdir)
    except (topo_lib.TopologyError, shd.MeshError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    path = os.path.join(workdir, REPORT_NAME)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
    print(f"report: {path}")
    return 0 if report["fits"] else 1


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)

