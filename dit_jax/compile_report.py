"""`dit-jax-train --compile-only --topology v5e:16x16`: compile the real training step for a TPU pod here.

The same `train.setup` (mesh, shardings) and `train.jit_train_step` (the pure step, jitted) as a real run,
lowered with abstract state and batch (ShapeDtypeStructs carrying the run's shardings) for the compile-only
devices of a TPU topology (dit_jax.topology) and compiled by libtpu. Nothing is read and no device memory
is allocated. The report (printed, and written to WORKDIR/compile_report.json) holds what XLA says one chip
needs, the state split by kind and against the even split over the fsdp x tensor chips (dit_jax.analysis.state_split),
how much of the state is replicated, the collectives of the compiled program with the bytes each chip moves
per step (dit_jax.analysis.collectives), the FLOPs of a step (analytic, and counted in the compiled program by
dit_jax.analysis.flops) and a lower bound on the step time; the exit status is 0 when it fits, 1 when it does not.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import mesh_plan, train
from dit_jax.analysis import mfu, state_split
from dit_jax.nn import remat as remat_lib
from dit_jax import sharding as shd
from dit_jax import topology as topo_lib
from dit_jax.analysis.collectives import MOVED_LABEL, collectives, collectives_by_op, moved_bytes_per_step
from dit_jax.analysis.flops import matmul_flops
from dit_jax.analysis.mfu import forward_macs
from dit_jax.training.state import with_shardings
from dit_jax.utils import paths
from dit_jax.utils.atomic import write_text
from dit_jax.vae import AutoencoderKL

GIB = 2**30
# plan_by_compiling compiles a smaller fsdp when its estimate is within this factor of the budget: the estimate
# was within 0.90-1.12x of the compiled bytes over the grid of docs/performance.md (4 sizes x 2 resolutions x 2 pods).
ESTIMATE_SLACK = 1.15
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
        out["image"] = jax.ShapeDtypeStruct((b, 8 * s, 8 * s, 3), jnp.uint8, sharding=sh)  # scaled in the step
    return out


def abstract_step_args(config, env, vae_params=None):
    """(state, batch, rng, vae_params): the arguments of train.jit_train_step(config, env) as ShapeDtypeStructs
    in the run's shardings (nothing allocated)."""
    state = with_shardings(env.abstract_state, env.state_shardings)
    batch = abstract_batch(config, env.model, env.batch_kind, env.mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(env.mesh))
    return state, batch, rng, vae_params


def abstract_vae(mesh):
    """(AutoencoderKL, replicated abstract params) of the default VAE (what load_vae returns, not loaded)."""
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
        leaves = jax.tree_util.tree_flatten_with_path(getattr(abstract_state, key))[0]
        shardings = jax.tree_util.tree_leaves(getattr(state_sh, key))
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
# FLOPs
# ----------------------------------------------------------------------------------------------------
def model_policy(model) -> str:
    """The remat policy the model runs (dit_jax/nn/remat.py)."""
    return remat_lib.resolve(model.remat_policy, model.remat)


def training_flops(config, model, vae=None, vae_params=None) -> Dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one optimizer step: forward + backward (2x forward) + the
    parts of the block forwards that the remat policy recomputes, for the global batch; plus the VAE encoder for image batches."""
    macs = forward_macs(model)
    t = (model.input_size // model.patch_size) ** 2
    recomputed = model.depth * remat_lib.recomputed_block_macs(model_policy(model), t, model.hidden_size,
                                                               int(model.hidden_size * model.mlp_ratio))
    per_example = 2 * (3 * macs["total"] + recomputed)
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
        vae_flops = float((cost or {}).get("flops", 0.0)) * b  # some backends give no cost analysis
    out["vae_encoder_flops_per_step"] = vae_flops
    out["train_flops_per_step"] = out["dit_flops_per_step"] + vae_flops
    return out


def cost_analysis(compiled) -> Dict[str, float]:
    """XLA's cost analysis of a compiled program as one dict (older jax: a list of one dict per program)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def compiled_flops(compiled, text: str) -> Dict[str, float]:
    """What the compiled program itself says, per chip per step: XLA's cost analysis (which counts a loop
    body once: the scan over blocks shows about one block) and the matmul FLOPs of its HLO with loops
    counted by their trip counts (dit_jax.analysis.flops)."""
    if compiled is None:
        return {"xla_cost_analysis_flops_per_chip": None, "hlo_matmul_flops_per_chip": None}
    return {"xla_cost_analysis_flops_per_chip": float(cost_analysis(compiled).get("flops", 0.0)) or None,
            "hlo_matmul_flops_per_chip": matmul_flops(text)}


def step_time_lower_bound(flops: Dict[str, Any], colls: Dict[str, Any], topo) -> Dict[str, Any]:
    """Seconds per step no program can beat on this pod: the compiled matmul FLOPs at the chip's bf16 peak,
    and the collective bytes each chip sends at its outbound ICI bandwidth (half the bidirectional figure;
    all links busy, nothing waits). The compiled program offers no step time of its own (libtpu's cost
    analysis returns a negative "optimal_seconds")."""
    f = flops.get("hlo_matmul_flops_per_chip")
    compute = f / (topo.peak_bf16_tflops * 1e12) if f else None
    ici = None
    if topo.ici_gbytes_per_s and colls:
        ici = moved_bytes_per_step(colls) / (topo.ici_gbytes_per_s * 1e9 / 2)
    known = [t for t in (compute, ici) if t is not None]
    return {"compute_seconds": compute, "ici_seconds": ici, "seconds": max(known) if known else None,
            "label": "lower bound: compiled matmul FLOPs at peak bf16; collective bytes moved at outbound ICI "
                     "bandwidth (no overlap loss, no contention)"}


def mfu_fields(model, global_batch: int, chips: int, device_kind: str) -> Dict[str, Any]:
    """MFU as training logs it (dit_jax.analysis.mfu): the model FLOPs per chip per step (no remat, no VAE), the chip's
    rated peak, and the step time a given MFU means; MFU of a measured step = mfu_flops_per_chip / (s x peak)."""
    per_chip = mfu.train_flops_per_example(model) * global_batch / chips
    peak = mfu.rated_peak(device_kind)
    out: Dict[str, Any] = {"mfu_flops_per_chip": per_chip, "rated_peak_bf16_tflops": None, "rated_peak_source": None,
                           "seconds_per_step_at_mfu": {}}
    if peak is not None:
        out.update(rated_peak_bf16_tflops=peak.bf16_tflops, rated_peak_source=peak.source,
                   seconds_per_step_at_mfu={f"{m:.2f}": mfu.step_time_at(m, per_chip, peak.bf16_tflops)
                                            for m in (0.4, 0.5, 0.6)})
    return out


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Compiled:
    """The training step of one mesh shape, set up as a run would and compiled (nothing allocated)."""

    config: Any  # the config with this candidate's mesh sizes
    env: Any  # train.TrainSetup
    vae: Any  # the abstract VAE for image batches, else None
    args: Tuple[Any, ...]  # (state, batch, rng, vae_params) as ShapeDtypeStructs
    compiled: Any  # the compiled program, or None when the compiler refused it for memory
    refusal: Any  # compiler_oom(...) of a refused program
    seconds: Tuple[float, float]  # (wall, CPU) to lower and compile
    acct: Dict[str, Any]  # state_accounting
    batch_bytes: int
    vae_bytes: int
    xla: Dict[str, int]  # xla_bytes
    total: int  # total_bytes(xla): what one chip holds while the step runs


def with_mesh(config, shape):
    """A copy of config with explicit mesh sizes (data, fsdp, tensor)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(v) for v in shape)
    return c


def compile_candidate(config, devices, process_count) -> Compiled:
    """train.setup + train.jit_train_step for `devices`, lowered with abstract arguments and compiled."""
    env = train.setup(config, devices=devices, process_count=process_count)
    vae, vae_params = abstract_vae(env.mesh) if env.batch_kind == "image" else (None, None)
    step = train.jit_train_step(config, env, vae)
    state, batch, rng, _ = abstract_step_args(config, env)
    args = (state, batch, rng, vae_params)
    acct = state_accounting(env.abstract_state, env.state_shardings, len(devices))
    batch_bytes = sum(shd.shard_bytes(x, x.sharding) for x in batch.values())
    vae_bytes = sum(shd.shard_bytes(x, x.sharding) for x in jax.tree_util.tree_leaves(vae_params)) if vae else 0
    compiled, refusal, seconds = compile_step(step, args, env.mesh)
    xla = xla_bytes(compiled, refusal, acct["per_chip"]["total"] + batch_bytes + vae_bytes)
    return Compiled(config, env, vae, args, compiled, refusal, seconds, acct, batch_bytes, vae_bytes, xla,
                    total_bytes(xla))


def searches_fsdp(config, plan, budget) -> bool:
    """Whether `plan_by_compiling` compiles candidates: config.mesh.plan is "compile", fsdp was chosen
    automatically (data and fsdp both auto) and there is a memory limit to fit (`budget`, and the one the
    plan was made for: config.mesh.memory_per_chip_gib or the chip's)."""
    return (config.mesh.get("plan", "compile") == "compile" and plan.requested[:2] == (0, 0)
            and budget is not None and plan.estimate is not None)


def _estimate(config, env) -> Dict[str, int]:
    """mesh_plan's estimated bytes per chip of the step `env` describes."""
    micro = max(1, int(config.global_batch_size) // int(config.grad_accum_steps))
    return mesh_plan.estimate_bytes(config, env.model, env.abstract_state.params, env.mesh, micro,
                                    env.batch_kind == "image")


def fewest_bytes_moved(fitting: Sequence[int], moved: Mapping[int, int]) -> int:
    """Of the fsdp sizes whose compiled step fits, the one whose collectives move the fewest bytes per chip per
    step (the all-reduce of plain data parallelism can move more than fsdp's reduce-scatter + all-gathers:
    DiT-XL/2 on v5e:16x16, docs/performance.md); a tie goes to the smaller fsdp."""
    return min(fitting, key=lambda f: (moved[f], f))


def plan_by_compiling(config, devices, process_count, budget) -> Tuple[Compiled, List[Dict[str, Any]]]:
    """An fsdp size chosen from compiled steps: mesh_plan's choice and its smaller or larger neighbours.

    The estimate's choice (its model times AUTO_MARGIN fits) is compiled first. When it fits, smaller fsdp
    sizes whose estimate alone is within ESTIMATE_SLACK of the budget are compiled in turn until one does not
    fit (the margin may have been too careful); when it does not fit, larger ones until one fits. Of the
    compiled steps that fit `budget` bytes per chip, the one whose collectives move the fewest bytes per chip
    per step is kept (ties: the smaller fsdp). -> (the chosen candidate, every candidate tried: mesh,
    estimated and compiled bytes, fits, bytes moved). Deterministic, so every process of a multi-host job
    picks the same mesh."""
    first = compile_candidate(config, devices, process_count)
    plan = first.env.plan
    if not searches_fsdp(config, plan, budget):
        return first, []
    data, f0, tensor = plan.shape
    rest = data * f0
    divisors = [f for f in range(1, rest + 1) if rest % f == 0]
    tried = {f0: (first, plan.estimate)}
    at = divisors.index(f0)
    if first.total <= budget:
        for f in reversed(divisors[:at]):  # smaller fsdp: less communication, if it really fits
            c = with_mesh(config, (rest // f, f, tensor))
            est = _estimate(c, train.setup(c, devices=devices, process_count=process_count))
            if est["total"] > ESTIMATE_SLACK * budget:
                break
            cand = compile_candidate(c, devices, process_count)
            tried[f] = (cand, est)
            if cand.total > budget:
                break
    else:
        for f in divisors[at + 1:]:  # larger fsdp until the compiled step fits
            cand = compile_candidate(with_mesh(config, (rest // f, f, tensor)), devices, process_count)
            tried[f] = (cand, _estimate(cand.config, cand.env))
            if cand.total <= budget:
                break
    moved = {f: moved_bytes_per_step(collectives(c.compiled.as_text())) if c.compiled is not None else None
             for f, (c, _) in tried.items()}
    fitting = sorted(f for f, (c, _) in tried.items() if c.total <= budget)
    chosen_f = fewest_bytes_moved(fitting, moved) if fitting else max(tried)
    rows = [{"data": rest // f, "fsdp": f, "tensor": tensor, "estimated_bytes": int(est["total"]),
             "compiled_bytes": int(c.total), "fits": c.total <= budget, "compiled": c.compiled is not None,
             "moved_bytes_per_step": moved[f], "compile_seconds": round(c.seconds[0], 2)}
            for f, (c, est) in sorted(tried.items())]
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    chosen, est = tried[chosen_f]
    what = (f"fsdp={chosen_f}: of the compiled steps that fit {g(budget)} per chip, the one that moves the fewest "
            f"bytes per step" if fitting else f"fsdp={chosen_f}: no candidate's compiled step fits {g(budget)} per chip")
    why = ("auto, by compiling candidates: " + what + " (" + "; ".join(
        f"fsdp={r['fsdp']} {g(r['compiled_bytes'])} compiled, {g(r['estimated_bytes'])} estimated"
        + (f", {g(r['moved_bytes_per_step'])} moved" if r["moved_bytes_per_step"] is not None else "")
        for r in rows) + f"; the estimate alone chose fsdp={f0})")
    chosen.env = dataclasses.replace(chosen.env, plan=dataclasses.replace(
        chosen.env.plan, requested=plan.requested, reason=why, estimate=est))
    return chosen, rows


def mesh_by_compiling(config, devices=None, process_count=None) -> Tuple[Any, str]:
    """For a run on this runtime's accelerators: (config with the mesh sizes `plan_by_compiling` chose, why),
    or (config unchanged, "") when nothing is to be chosen that way (config.mesh.plan="estimate", data or fsdp
    set, or no memory limit: CPU). Costs one compile of the step per candidate tried, before the run."""
    devices = shd.select_devices(config.mesh, devices, process_count)
    m = config.mesh
    if m.get("plan", "compile") != "compile" or m.data is not None or m.fsdp is not None:
        return config, ""
    hbm, _ = topo_lib.memory_per_chip(m, devices[0])
    if not hbm:
        return config, ""
    cand, rows = plan_by_compiling(config, devices, process_count, (1 - mesh_plan.HEADROOM) * hbm)
    if not rows:
        return config, ""
    return with_mesh(config, cand.env.plan.shape), cand.env.plan.reason


def compile_for_topology(config, topo: topo_lib.Topology, workdir: str = "") -> Dict[str, Any]:
    """Compile the training step of `config` for `topo`; returns the report (see the module docstring)."""
    notes = []
    config = config.copy_and_resolve_references()
    if config.mesh.num_devices:
        notes.append(f"config.mesh.num_devices={config.mesh.num_devices} ignored: a pod run uses all "
                     f"{topo.chips} chips")
        with config.unlocked():
            config.mesh.num_devices = None
    hbm, hbm_source = topo_lib.memory_per_chip(config.mesh, topo.devices[0])
    budget = (1 - mesh_plan.HEADROOM) * hbm
    cand, candidates = plan_by_compiling(config, topo.devices, topo.hosts, budget)
    config, env, vae, compiled, refusal, seconds = (cand.config, cand.env, cand.vae, cand.compiled, cand.refusal,
                                                    cand.seconds)
    mesh, model, plan, kind, acct, xla, total = (env.mesh, env.model, env.plan, env.batch_kind, cand.acct,
                                                 cand.xla, cand.total)
    vae_params = cand.args[3]
    if refusal is not None:
        notes.append(f"the TPU compiler refused the program: {refusal['message']}")
    fits = total <= budget
    flops = training_flops(config, model, vae, vae_params)
    flops["train_flops_per_chip"] = flops["train_flops_per_step"] / topo.chips
    flops["seconds_per_step_at_peak"] = flops["train_flops_per_chip"] / (topo.peak_bf16_tflops * 1e12)
    text = compiled.as_text() if compiled is not None else ""
    colls = collectives(text) if text else {}
    flops.update(compiled_flops(compiled, text))
    split = state_split.split_report(env.abstract_state.params, mesh, config.sharding)
    even = acct["total"]["total"] / split["chips_sharing_state"]  # the state is meant to be split over these
    flops.update(mfu_fields(model, int(config.global_batch_size), topo.chips, topo.devices[0].device_kind))
    batch_bytes, vae_bytes = cand.batch_bytes, cand.vae_bytes
    report = {
        "topology": topo.name, "generation": topo.generation, "chips": topo.chips, "hosts": topo.hosts,
        "devices_per_chip": 1, "tensorcores_per_chip": topo.tensorcores_per_chip, "megacore": topo.megacore,
        "model": config.model.name or "custom", "image_size": 8 * model.input_size if kind != "x" else model.input_size,
        "global_batch_size": int(config.global_batch_size), "grad_accum_steps": int(config.grad_accum_steps),
        "dtype": config.model.dtype, "remat": model_policy(model) != "none", "remat_policy": model_policy(model),
        "batch_kind": kind,
        "mesh": plan.as_dict(), "mesh_axes": dict(mesh.shape),
        "hbm_bytes_per_chip": hbm, "hbm_source": hbm_source, "mesh_candidates": candidates,
        "state_bytes_per_chip": acct["per_chip"], "state_bytes_total": acct["total"],
        "state_per_chip_vs_even_split": acct["per_chip"]["total"] / even, "state_split": split,
        "data_parallel_by_choice": split["chips_sharing_state"] == 1,
        "batch_bytes_per_chip": batch_bytes, "vae_bytes_per_chip": vae_bytes,
        "temp_bytes_per_chip": xla["temp"], "total_bytes_per_chip": total, "xla_memory_analysis": xla,
        "estimated_bytes_per_chip": plan.estimate,
        "fits": fits, "headroom": mesh_plan.HEADROOM, "budget_bytes_per_chip": int(budget),
        "replicated_state_fraction": acct["replicated_fraction"],
        "largest_replicated": acct["largest_replicated"],
        "compiled": compiled is not None,
        "collectives": colls,
        "collective_bytes_moved_per_chip_per_step": moved_bytes_per_step(colls) if compiled is not None else None,
        "collective_bytes_label": MOVED_LABEL, "collectives_by_op": collectives_by_op(text) if text else [],
        "compile_seconds": round(seconds[0], 2), "compile_cpu_seconds": round(seconds[1], 2),
        "flops": flops, "step_time_lower_bound": step_time_lower_bound(flops, colls, topo), "notes": notes,
    }
    if split["uneven"]:
        notes.append(f"uneven state split: {state_split.describe(split)}")
    if not fits:
        report["suggestions"] = suggestions(config, report, env)
    return report


_SIZE = r"([0-9.]+)\s*([KMGT]i?B?)"
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compiler_oom(error: BaseException):
    """{'temp_bytes', 'message'} when `error` is libtpu's out-of-HBM refusal, else None.

    libtpu does not return a program whose temporaries exceed HBM; its message carries the size, e.g.
    "RESOURCE_EXHAUSTED: ... the total memory required for HLO temporaries (22.08G) exceeds available HBM".
    """
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next((ln.strip() for ln in text.splitlines() if "memory" in ln.lower()), text.strip())[:300]
    m = re.search(r"temporaries\s*\(" + _SIZE, text) or re.search(r"[Uu]sed\s+" + _SIZE, text)
    if m is None:
        return None
    return {"temp_bytes": int(float(m.group(1)) * _UNITS[m.group(2)[0]]), "message": line}


def compile_step(step, args, mesh):
    """-> (compiled or None, the compiler's out-of-HBM refusal or None, (wall s, CPU s))."""
    t0, c0 = time.time(), time.process_time()
    compiled, refusal = None, None
    with mesh:
        lowered = step.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as e:  # libtpu refuses a program whose temporaries exceed HBM: that is the answer
            refusal = compiler_oom(e)
            if refusal is None:
                raise
    return compiled, refusal, (time.time() - t0, time.process_time() - c0)


def xla_bytes(compiled, refusal, argument_bytes: int) -> Dict[str, int]:
    """XLA's memory analysis per chip; for a refused program, the arguments as the shardings give them
    (`argument_bytes`) and the temporaries from the compiler's message."""
    if compiled is None:
        return {"argument": argument_bytes, "output": 0, "alias": 0, "temp": refusal["temp_bytes"],
                "generated_code": 0}
    mem = compiled.memory_analysis()
    return {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "output", "alias", "temp", "generated_code")}


def total_bytes(xla: Dict[str, int]) -> int:
    """What a chip holds while the step runs: arguments + outputs - the donated (aliased) + temporaries + code."""
    return xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] + xla["generated_code"]


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
    if report.get("remat_policy", "full") != "full":
        out.append("rematerialise the blocks: --config.model.remat_policy=full (keeps only each block's input for "
                   f"the backward pass; temporaries are {report['temp_bytes_per_chip'] / GIB:.2f} GiB per chip now)")
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
    if r["data_parallel_by_choice"]:
        split = "data-parallel by choice: fsdp = tensor = 1, every chip holds the whole state"
        replicated = "state replicated on every chip (data-parallel by choice)"
    else:
        split = (f"{r['state_per_chip_vs_even_split']:.2f}x the even split over the "
                 f"{r['state_split']['chips_sharing_state']} fsdp x tensor chips")
        replicated = (f"replicated state {100 * r['replicated_state_fraction']:.3f}% of "
                      f"{g(r['state_bytes_total']['total'])}")
    colls = r["collectives"]
    if r["compiled"]:
        comm = ("collectives per step: " + ", ".join(f"{k} {v['count_per_step']}x" for k, v in sorted(colls.items()))
                + f"; {r['collective_bytes_label']}: {g(r['collective_bytes_moved_per_chip_per_step'])}"
                + (" (" + ", ".join(f"{k} {g(v['moved_bytes_per_step'])}" for k, v in sorted(colls.items())) + ")"
                   if colls else ""))
        top = r.get("collectives_by_op", [])[:3]
        comm += ("; most moved: " + ", ".join(f"{o['kind']} {o['count_per_step']}x {o['op_name']} "
                                               f"{g(o['moved_bytes_per_step'])}" for o in top)) if top else ""
    else:
        comm = "no program (refused by the compiler), so no collectives"
    fl, lb = r["flops"], r["step_time_lower_bound"]
    tf = lambda x: "n/a" if x is None else f"{x / 1e12:.2f}"  # noqa: E731
    ms = lambda x: "n/a" if x is None else f"{x * 1e3:.0f} ms"  # noqa: E731
    lines = [
        f"{r['model']} {r['image_size']} px, batch {r['global_batch_size']} ({r['batch_kind']}), {r['dtype']}"
        f"{', remat ' + r.get('remat_policy', '') if r['remat'] else ''} on {r['topology']}: {r['chips']} chips, {r['hosts']} hosts",
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}{sub}; {m['reason']}",
        f"per chip: state {g(st['total'])} (params {g(st['params'])}, EMA {g(st['ema'])}, optimizer "
        f"{g(st['optimizer'])}; {split}), batch {g(r['batch_bytes_per_chip'])}"
        + (f", VAE {g(r['vae_bytes_per_chip'])}" if r["vae_bytes_per_chip"] else "")
        + f", temporaries {g(r['temp_bytes_per_chip'])}, total {g(r['total_bytes_per_chip'])} of "
          f"{g(r['hbm_bytes_per_chip'])} HBM",
        f"{replicated}; {comm}",
        f"TFLOP per chip per step: {tf(fl['train_flops_per_chip'])} analytic, "
        f"{tf(fl['hlo_matmul_flops_per_chip'])} in the compiled program's matmuls (XLA's cost analysis says "
        f"{tf(fl['xla_cost_analysis_flops_per_chip'])}: it counts a loop body once); step time >= "
        f"{ms(lb['seconds'])} (compute at peak {ms(lb['compute_seconds'])}, collectives at ICI bandwidth "
        f"{ms(lb['ici_seconds'])}); lowered and compiled in {r['compile_seconds']:.1f} s "
        f"({r['compile_cpu_seconds']:.0f} CPU s)",
    ]
    f = r["flops"]
    if f.get("rated_peak_bf16_tflops"):
        lines.append(f"MFU (model FLOPs {f['mfu_flops_per_chip'] / 1e12:.2f} TFLOP per chip per step / rated "
                     f"{f['rated_peak_bf16_tflops']:g} TFLOP/s): 50% MFU is "
                     f"{f['seconds_per_step_at_mfu']['0.50'] * 1e3:.0f} ms/step; MFU of a measured step of s seconds "
                     f"= {f['mfu_flops_per_chip'] / (f['rated_peak_bf16_tflops'] * 1e12):.4g} / s")
    lines += [f"note: {n}" for n in r["notes"]]
    if r["fits"]:
        lines.append(f"FITS: {g(r['total_bytes_per_chip'])} <= {100 * (1 - r['headroom']):.0f}% of "
                     f"{g(r['hbm_bytes_per_chip'])}")
    else:
        lines.append(f"DOES NOT FIT: {g(r['total_bytes_per_chip'])} > {100 * (1 - r['headroom']):.0f}% of "
                     f"{g(r['hbm_bytes_per_chip'])}; try:")
        lines += [f"  {s}" for s in r["suggestions"]]
    return "\n".join(lines)


def write_report(report: Dict[str, Any], workdir: paths.PathLike) -> str:
    """WORKDIR/compile_report.json (a local folder or a bucket URL), written atomically; -> its path."""
    path = paths.as_path(workdir) / REPORT_NAME
    write_text(path, json.dumps(report, indent=1, default=_json_default))
    return paths.display(path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)

