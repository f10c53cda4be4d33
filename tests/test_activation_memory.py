"""The training step's memory, compiled by libtpu for a TPU slice on this CPU (as `--compile-only` does): no
copy of the stacked block parameters, and activations per example ordered by remat policy.

Small models (DiT-S/2 with 4 blocks at 256 px; for the order of the policies, 2 blocks of width 128) so each
compilation takes seconds; the DiT-XL/2 numbers are in docs/performance.md ("Activation memory and remat
policies").
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from dit_jax import compile_report, mesh_plan, topology, train
from dit_jax import sharding as shd

GIB = 2**30
DEPTH = 4
TOLERANCE = 0.10  # issue 21: the estimate within 10% of the compiled total


def _config(policy, batch, dtype="bfloat16", narrow=False):
    """DiT-S/2 at 256 px (256 tokens) with DEPTH blocks; narrow: 2 blocks of width 128 (2 heads of 64)."""
    c = default.get_config("S/2")
    c.data.name = "latents"
    c.model.depth = DEPTH
    if narrow:
        c.model.depth, c.model.hidden_size, c.model.num_heads = 2, 128, 2
    c.model.dtype = dtype
    c.model.remat_policy = policy
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 1, 1
    c.global_batch_size = batch
    return c


_COMPILED = {}  # (policy, batch, dtype, narrow) -> (compiled, env): several tests read the same S/2 programs


def _compile_small(policy, batch, dtype="bfloat16", narrow=False):
    """_compile(_config(...)) once per module for each (policy, batch, dtype, narrow)."""
    key = (policy, batch, dtype, narrow)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(_config(policy, batch, dtype, narrow))
    return _COMPILED[key]


def _compile(config):
    """(compiled train step, setup) for v5p:2x2x1 (4 chips, data parallel)."""
    topo = topology.tpu_topology("v5p:2x2x1")
    env = train.setup(config, devices=topo.devices, process_count=topo.hosts)
    step = train.jit_train_step(config, env)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   env.abstract_state, env.state_shardings)
    batch = compile_report.abstract_batch(config, env.model, env.batch_kind, env.mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(env.mesh))
    compiled, refusal, _ = compile_report.compile_step(step, (state, batch, rng, None), env.mesh)
    assert refusal is None
    return compiled, env


@pytest.mark.slow
def test_no_compute_dtype_copy_of_the_stacked_parameters():
    """XLA (TPU) used to cast all the stacked block parameters to bfloat16 once, before the loop over the
    blocks: a copy of them (1.26 GiB for DiT-XL/2) alive through the forward and backward passes. Each block's
    slice is rounded in the loop now (dit_jax.model.block_step); no (depth, ...) bfloat16 array of a stacked
    parameter's shape is left in the compiled step."""
    compiled, env = _compile_small("save_dots", 16)
    hlo = compiled.as_text()
    shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(env.abstract_state.params["blocks"]) if x.ndim == 3}
    assert (DEPTH, 384, 1152) in shapes  # the qkv kernels
    copies = [s for s in shapes if re.search(r"bf16\[%s\]" % ",".join(map(str, s)), hlo)]
    assert not copies, copies


@pytest.mark.slow
def test_activation_bytes_per_example_by_policy():
    """Temporaries grow with the batch by what the policy keeps: "none" keeps every intermediate and the
    attention probabilities, save_dots the matmul outputs, save_qkv_proj qkv and proj, full each block's input.
    The narrow DiT (2 blocks of width 128, 256 tokens; what a policy keeps per token is in units of the width,
    tests/test_remat_policies.py), 1 and 4 images per chip: 8 compilations of a few seconds each."""
    per_example = {}
    for policy in ("none", "save_dots", "save_qkv_proj", "full"):
        temps = [_compile_small(policy, b, narrow=True)[0].memory_analysis().temp_size_in_bytes for b in (4, 16)]
        per_example[policy] = (temps[1] - temps[0]) / 3  # per image per chip: 3 more examples on each of 4 chips
    print({k: f"{v / 2**20:.2f} MiB" for k, v in per_example.items()})
    assert per_example["save_dots"] < 0.6 * per_example["none"]
    assert per_example["save_qkv_proj"] < per_example["save_dots"]
    assert per_example["full"] < per_example["save_qkv_proj"]


@pytest.mark.slow
def test_mesh_plan_estimate_against_the_compiled_total():
    """mesh_plan's estimate of the step's bytes per chip (what "auto" picks fsdp by) against XLA's memory
    analysis of the same program: DiT-S/2 with 4 blocks, save_dots, 4 and 16 images per chip. Within 10% at
    16 per chip (measured +2%); at 4 per chip this small model's estimate is 12% over (297 vs 332 MiB: the
    batch-independent part is overestimated), the safe side for "auto" (it shards more, never too little);
    DiT-XL/2 (docs/performance.md) is within 1-4% at both batches."""
    ratios = []
    for batch in (16, 64):
        config = _config("save_dots", batch)
        compiled, env = _compile_small("save_dots", batch)
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        est = mesh_plan.estimate_bytes(config, env.model, env.abstract_state.params, env.mesh, batch, False)
        print(f"batch {batch}: compiled {total / 2**20:.0f} MiB, estimate {est['total'] / 2**20:.0f} MiB")
        ratios.append(est["total"] / total)
    assert abs(ratios[1] - 1) <= TOLERANCE and 1 <= ratios[0] <= 1 + 1.5 * TOLERANCE, ratios


def _xl2(resolution, batch):
    c = default.get_config("XL/2" + (",512" if resolution == 512 else ""))
    c.data.name, c.model.dtype, c.model.remat_policy = "latents", "bfloat16", None  # the platform's default
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 1, 1
    c.global_batch_size = batch
    return c


@pytest.mark.slow
@pytest.mark.parametrize("resolution,per_image_limit", [(256, 0.25), (512, 1.0)])
def test_xl2_default_policy_meets_issue_21_targets(resolution, per_image_limit):
    """Issue 21's measurement (DiT-XL/2, bf16, latents, v5p:2x2x1, data 4 x fsdp 1, batch 16 vs 64, the default
    policy, no full remat): activations per image per chip under the limit; at 256 px the temporaries that do
    not grow with the batch at most 1.5x the float32 gradients. Four DiT-XL/2 compilations (minutes; run under
    flock /tmp/dit-heavy.lock)."""
    temps = []
    for batch in (16, 64):
        compiled, env = _compile(_xl2(resolution, batch))
        assert env.model.remat_policy not in ("none", "full")
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    per_image = (temps[1] - temps[0]) / 12  # 4 -> 16 images per chip
    fixed = temps[0] - 4 * per_image
    grads = 4 * sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(env.abstract_state.params))
    print(f"{resolution} px: {per_image / GIB:.3f} GiB per image per chip, {fixed / GIB:.2f} GiB batch-independent")
    assert per_image <= per_image_limit * GIB
    if resolution == 256:
        assert fixed <= 1.5 * grads
