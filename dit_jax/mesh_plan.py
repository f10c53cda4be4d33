"""The mesh of a run: explicit sizes from config.mesh, or a data x fsdp (x tensor) split chosen for the chips.

config.mesh.data / fsdp / tensor: a positive size, -1 for "the devices left over", or None (unset) for "auto":
- tensor auto: 1, unless the micro-batch has fewer examples than there are devices; then the smallest
  tensor size that leaves data x fsdp dividing the micro-batch (every batch axis needs whole examples).
  With data or fsdp at -1 ("all the rest") tensor auto is 1.
- fsdp auto: the smallest fsdp size (a divisor of the devices left for data x fsdp) whose estimated
  bytes per chip (`estimate_bytes`) fit the accelerator's memory with `HEADROOM` to spare; data takes the
  rest. Why the smallest: the batch is split over data x fsdp either way, so the activations per chip do
  not change; only the parameters, EMA and Adam moments shrink with fsdp, and plain data parallelism
  communicates least (one gradient all-reduce, where fsdp adds parameter all-gathers in the forward and
  backward passes). Without a memory limit (CPU: host memory) fsdp auto is 1.
- data auto: whatever data x fsdp x tensor leaves.
The estimate is a model of what XLA allocates: the state and gradients from the shardings (exact), the
activations the remat policy keeps counted from the traced program (dit_jax/analysis/block_memory.py, the same on
every platform), plus libtpu's second copy of them on TPU (measured with --compile-only; docs/performance.md);
`dit-jax-train --compile-only` measures the real number, and with config.mesh.plan="compile" (the default)
dit_jax.compile_report.plan_by_compiling compiles the step for this choice and its neighbours and keeps the
smallest fsdp whose compiled bytes fit (here only the estimate; config.mesh.memory_per_chip_gib overrides the
chip's memory in both).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from dit_jax.nn import attention
from dit_jax.analysis import block_memory
from dit_jax.nn import remat as remat_lib
from dit_jax import sharding as shd

GIB = 2**30
HEADROOM = 0.10  # a program fits when it needs at most (1 - HEADROOM) of the memory per chip
AUTO_MARGIN = 1.25  # "auto" wants the estimate times this to fit (the estimate is a model, not a measurement)


@dataclasses.dataclass
class MeshPlan:
    shape: Tuple[int, int, int]  # (data, fsdp, tensor)
    fsdp_groups: Tuple[int, ...]  # fsdp sub-axis sizes (shd.fsdp_groups)
    requested: Tuple[int, int, int]  # config.mesh (data, fsdp, tensor); 0 = auto (None there), -1 = the rest
    reason: str  # one sentence: how the shape was chosen
    estimate: Optional[Dict[str, int]] = None  # estimated bytes per chip of the chosen shape

    def as_dict(self) -> Dict[str, Any]:
        d, f, t = self.shape
        return {"data": d, "fsdp": f, "tensor": t, "fsdp_sub_axes": list(self.fsdp_groups),
                "requested": dict(zip(("data", "fsdp", "tensor"),
                                      ["auto" if s == 0 else s for s in self.requested])),
                "reason": self.reason}


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def activation_bytes_per_example(model, data_parallel_only: bool = False, platform: str = "tpu") -> int:
    """Activations of one example through the DiT blocks (bytes), the part that grows with the batch, under
    the model's remat policy (docs/performance.md, "Activation memory and remat policies").

    What the backward pass keeps of each block is counted exactly, from JAX's list of the residuals one block
    saves (dit_jax/analysis/block_memory.py; the same on every platform). Added: the backward pass of one block at a
    time (what "none" keeps of one block: the recomputed block's values) and, on TPU with the parameters
    replicated (`data_parallel_only`: fsdp 1) and XLA's attention (256 px), a second copy of the kept values:
    measured with --compile-only for DiT-XL/2 on v5p (every policy but "none" at 256 px; not with the Pallas
    kernel at 512 px; docs/performance.md). On GPU no such copy is assumed (not measured on a GPU yet)."""
    every = block_memory.model_kept_bytes(model, "none")[0]  # what "none" keeps of a block
    policy = remat_lib.resolve(model.remat_policy, model.remat)
    if policy == "none":
        return model.depth * every
    kept = block_memory.model_kept_bytes(model, policy)[0]
    t = (model.input_size // model.patch_size) ** 2
    kernel = attention.resolve(model.attention_impl, platform, t, model.hidden_size // model.num_heads,
                               model.dtype)
    copies = 2 if data_parallel_only and platform == "tpu" and kernel == "xla" else 1
    return model.depth * kept * copies + every


def _total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def estimate_bytes(config, model, abstract_params, mesh, micro_batch: int, image_batch: bool) -> Dict[str, int]:
    """Estimated bytes per chip of a training step on `mesh` (see the module docstring)."""
    p_sh = shd.param_shardings(abstract_params, mesh, config.sharding)
    params = sum(shd.shard_bytes(x, s) for x, s in zip(jax.tree_util.tree_leaves(abstract_params),
                                                       jax.tree_util.tree_leaves(p_sh)))
    state = 4 * params  # params, EMA, Adam mu and nu
    # The float32 gradients (the blocks' parameters are stacked, so the step copies neither them nor their
    # gradients); accumulation adds the gradients' sum; what the blocks keep whatever the batch ("none": each
    # block's compute-dtype weights; split like the parameters).
    policy = remat_lib.resolve(model.remat_policy, model.remat)
    fixed = model.depth * block_memory.model_kept_bytes(model, policy)[1] * params // max(1, _total_bytes(abstract_params))
    temps = int((1 + (int(config.grad_accum_steps) > 1)) * params) + fixed
    per_chip = max(1, micro_batch // shd.data_parallel_size(mesh))
    platform = mesh.devices.flat[0].platform
    acts = per_chip * activation_bytes_per_example(model, shd.axis_size(mesh, "fsdp") == 1, platform)
    if image_batch:  # the VAE (float32, replicated) and its encoder's largest activations
        acts += 340 * 2**20 + per_chip * (8 * model.input_size) ** 2 * 128 * 4 * 3
    return {"state": state, "temps": temps, "activations": acts, "total": state + temps + acts}


def plan_mesh(config, devices: Sequence[Any], model, abstract_params, hbm_bytes: Optional[int],
              image_batch: bool = False) -> MeshPlan:
    """Resolve config.mesh for these devices (see the module docstring); explicit sizes are checked only."""
    m = config.mesh
    req = tuple(0 if v is None else int(v) for v in (m.data, m.fsdp, m.tensor))  # 0: auto, from here on
    n = len(devices)
    micro = max(1, int(config.global_batch_size) // max(1, int(config.grad_accum_steps)))
    if 0 not in req:
        shape = shd.mesh_shape(m, n)
        groups = shd.fsdp_groups(abstract_params, shape[1], config.sharding, shape[2])
        return MeshPlan(shape, groups, req, "explicit config.mesh sizes")
    desc = shd.describe_mesh(tuple(None if v == 0 else v for v in req))
    if sum(s == -1 for s in req) > 1:
        raise shd.MeshError(f"{desc}: at most one axis may be -1")
    if any(s < -1 for s in req):
        raise shd.MeshError(f"{desc}: axis sizes must be positive, -1 for 'the rest' or unset (None) for 'auto'")
    fixed = int(np.prod([s for s in req if s > 0]))
    if n % fixed:
        raise shd.MeshError(f"{desc} does not fit {n} devices: {n} is not divisible by {fixed}")
    data, fsdp, tensor = req
    rest = n // fixed  # devices for the axes that are auto or -1
    why = []
    batch_fixed = int(np.prod([s for s in (data, fsdp) if s > 0]))
    if data > 0 and fsdp > 0:
        tensor = rest  # tensor is the only axis left (auto or -1)
    elif tensor == -1 or -1 in (data, fsdp):
        tensor = 1  # the other axes take every device
    elif tensor == 0:
        ok = [t for t in _divisors(rest) if micro % (batch_fixed * (rest // t)) == 0]
        tensor = ok[0] if ok else 1
        if tensor > 1:
            why.append(f"tensor={tensor}: data x fsdp must divide the micro-batch of {micro} examples")
    rest //= tensor
    if data > 0 and fsdp > 0:
        pass  # only tensor was left
    elif data > 0:  # fsdp auto or -1
        fsdp = rest
    elif fsdp > 0:
        data = rest
    else:
        fsdp, why_f = _choose_fsdp(config, devices, model, abstract_params, hbm_bytes, image_batch,
                                   rest, tensor, micro)
        data = rest // fsdp
        why.append(why_f)
    shape = (data, fsdp, tensor)
    if int(np.prod(shape)) != n:
        raise shd.MeshError(f"{desc} resolved to data={data}, fsdp={fsdp}, tensor={tensor}, which is not "
                            f"{n} devices")
    groups = shd.fsdp_groups(abstract_params, fsdp, config.sharding, tensor)
    est = None
    if hbm_bytes:
        mesh = shd.make_mesh(shape, devices, groups)
        est = estimate_bytes(config, model, abstract_params, mesh, micro, image_batch)
    reason = "auto: " + "; ".join(w for w in why if w) if why else "auto"
    return MeshPlan(shape, groups, req, reason, est)


def _choose_fsdp(config, devices, model, abstract_params, hbm_bytes, image_batch, rest, tensor, micro
                 ) -> Tuple[int, str]:
    if not hbm_bytes:
        return 1, "fsdp=1 (data parallel): no accelerator memory limit to fit"
    budget = (1 - HEADROOM) * hbm_bytes
    tried = []
    for f in _divisors(rest):
        groups = shd.fsdp_groups(abstract_params, f, config.sharding, tensor)
        mesh = shd.make_mesh((rest // f, f, tensor), devices, groups)
        est = estimate_bytes(config, model, abstract_params, mesh, micro, image_batch)
        tried.append((f, est["total"]))
        if est["total"] * AUTO_MARGIN <= budget:
            smaller = f"; fsdp={tried[-2][0]} would need ~{tried[-2][1] / GIB:.1f} GiB" if len(tried) > 1 else ""
            return f, (f"fsdp={f}: the smallest fsdp whose estimated {est['total'] / GIB:.1f} GiB per chip "
                       f"(x{AUTO_MARGIN} margin) fits {(1 - HEADROOM) * 100:.0f}% of {hbm_bytes / GIB:.0f} GiB"
                       f"{smaller}")
    f, total = tried[-1]
    return f, (f"fsdp={f} (all {rest} devices): even then the estimate is {total / GIB:.1f} GiB per chip, more than "
               f"{(1 - HEADROOM) * 100:.0f}% of {hbm_bytes / GIB:.0f} GiB")
