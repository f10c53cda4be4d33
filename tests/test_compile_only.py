"""--compile-only: the real training step compiled for TPU pods on this CPU (libtpu), and pod-scale sharding."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from configs import default, digits
from dit_jax import compile_report, mesh_plan, topology, train
from dit_jax import sharding as shd
from dit_jax.utils.errors import ConfigError

GIB = 2**30
# libtpu comes with the project's test setup (the `tpu` extra, scripts/setup_env.sh); without it these fail.


def _s2_latents(batch):
    c = default.get_config("S/2")
    c.data.name = "latents"
    c.global_batch_size = batch
    return c


def _xl2(fsdp=None, data=None):
    c = default.get_config()
    c.data.name = "latents"
    c.model.dtype = "bfloat16"
    if fsdp:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data or 1, fsdp, 1
    return c


def _independent_state_bytes(env, device):
    """Bytes of `device`'s shards of the whole state, from the index map of each sharding (not shard_shape)."""
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(env.abstract_state), jax.tree_util.tree_leaves(env.state_shardings)):
        idx = s.devices_indices_map(tuple(x.shape))[device]
        shape = [len(range(*sl.indices(n))) for sl, n in zip(idx, x.shape)]
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------------------------------
# Pod-scale sharding (no compile: shardings and byte counts only)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pod", ["v5e:16x16", "v4:8x8x8"])  # 256 chips; 512 chips (v4 megacore)
def test_xl2_fsdp_over_all_chips_leaves_under_1_percent_replicated(pod):
    topo = topology.tpu_topology(pod)
    cfg = _xl2(fsdp=topo.chips)
    cfg.global_batch_size = max(256, topo.chips)  # at least one example per chip
    env = train.setup(cfg, devices=topo.devices, process_count=topo.hosts)
    acct = compile_report.state_accounting(env.abstract_state, env.state_shardings, topo.chips)
    assert acct["replicated_fraction"] < 0.01, acct["largest_replicated"][:3]
    assert acct["per_chip"]["total"] <= 1.25 * acct["total"]["total"] / topo.chips
    # The attention kernels (1152 x 3456, 1152 x 1152) are split over both of their dimensions.
    specs = shd.spec_tree(env.state_shardings.params)
    qkv = specs["blocks/attn/qkv/kernel"]  # (depth, 1152, 3456): the depth axis whole, both others split
    assert qkv[0] is None and len(qkv) == 3 and all(d is not None for d in qkv[1:]), qkv
    assert len(shd.fsdp_axes(env.mesh)) > 1 and shd.axis_size(env.mesh, "fsdp") == topo.chips
    assert _independent_state_bytes(env, topo.devices[0]) == acct["per_chip"]["total"]


def test_fsdp_groups_merge_primes_that_every_parameter_treats_alike():
    class Cfg:
        fsdp_min_size = 1
        logical_axis_rules = ()

    shapes = {"a": jax.ShapeDtypeStruct((1152, 3456), np.float32), "b": jax.ShapeDtypeStruct((4608,), np.float32)}
    assert shd.fsdp_groups(shapes, 256, Cfg) == (128, 2)  # 3456 takes 2^7, 1152 the last 2
    assert shd.fsdp_groups(shapes, 8, Cfg) == (8,)  # one dimension suffices: a plain fsdp axis
    assert shd.fsdp_groups(shapes, 1, Cfg) == (1,)


def test_auto_mesh_on_v5e_256_and_on_cpu():
    topo = topology.tpu_topology("v5e:16x16")
    cfg = default.get_config()
    env = train.setup(cfg, devices=topo.devices, process_count=topo.hosts)
    plan = env.plan
    d, f, t = plan.shape
    assert d * f == 256 and t == 1 and 1 < f < 256 and "smallest fsdp" in plan.reason
    # How good the estimate behind that choice is: test_s2_compiles_for_v4_megacore_and_state_bytes_add_up
    # compares it with the compiled program's memory analysis.
    # The digits config: 128 examples on 256 chips -> a tensor axis of 2 (data x fsdp must divide the batch).
    c = digits.get_config()
    env = train.setup(c, devices=topo.devices, process_count=topo.hosts)
    assert env.plan.shape[2] == 2 and "tensor=2" in env.plan.reason
    # On CPU there is no memory limit to fit: plain data parallelism over the 8 test devices.
    assert train.setup(digits.get_config()).plan.shape == (8, 1, 1)


# ----------------------------------------------------------------------------------------------------
# FLOPs against the paper and the compiled program (collectives: tests/test_hlo_collectives.py)
# ----------------------------------------------------------------------------------------------------
def test_forward_macs_match_the_papers_table_4():
    """Every Gflops entry of the paper's Table 4 (multiply-adds of one forward at 256 px, and XL/2 at 512 px),
    within half a unit of the printed last digit plus 0.05% (the worst, S/8: 0.358 for "0.36")."""
    from benchmarks.flops import PAPER_GFLOPS
    from dit_jax.model import DiT_models

    assert len(PAPER_GFLOPS) == 13
    for (name, px), paper in PAPER_GFLOPS.items():
        got = compile_report.forward_macs(DiT_models[name](input_size=px // 8))["total"] / 1e9
        assert abs(got - paper) <= 0.005 + 5e-4 * paper, (name, px, got, paper)


@pytest.mark.slow  # ~16 s (S/2) or ~8 s (narrow) of CPU per compile
@pytest.mark.parametrize("depth,policy", [(1, "none"), (3, "full"), (3, "save_qkv_proj")])
def test_training_flops_match_the_compiled_program(depth, policy):
    """The analytic FLOPs of a step against the compiled program (DiT-S/2 on v5e:2x2, batch 8):
    - one block (no loop): XLA's cost analysis counts every op, so it is above the matmul-only analytic count
      by the elementwise work; measured +2.1%, allowed 0..4%;
    - the matmul FLOPs counted in the compiled HLO (dit_jax.analysis.flops, loops times their trip count) equal the
      analytic count within 0.5% (measured -0.11% for one block, -0.03% for 3 scanned blocks with remat: the
      rematerialised forward is counted once more; save_qkv_proj's recomputed attention and MLP matmuls,
      dit_jax.nn.remat.recomputed_block_macs); the backward has no input gradient for the patch embedding, so
      the compiled count is a little lower.
    The 3-block programs are narrowed to width 128 (2 heads of 64; measured -0.07%): both counts are of the same
    matmuls, whatever their width, and a narrow step compiles in half the time. The one-block program keeps
    DiT-S/2's width: the elementwise share that XLA's cost analysis adds grows as the width shrinks (+4.5% at
    width 128)."""
    cfg = _s2_latents(8)
    cfg.model.depth, cfg.model.remat_policy = depth, policy
    if depth > 1:
        cfg.model.hidden_size, cfg.model.num_heads = 128, 2
    rep = compile_report.compile_for_topology(cfg, topology.tpu_topology("v5e:2x2"))
    fl = rep["flops"]
    analytic = fl["train_flops_per_chip"]
    assert abs(fl["hlo_matmul_flops_per_chip"] / analytic - 1) < 0.005, (fl, analytic)
    if depth == 1:
        xla = fl["xla_cost_analysis_flops_per_chip"]
        assert 0 <= xla / analytic - 1 <= 0.04, (xla, analytic)
        assert fl["hlo_matmul_flops_per_chip"] <= xla
    else:  # XLA's cost analysis sees one of the 3 blocks of the loop
        assert fl["xla_cost_analysis_flops_per_chip"] < 0.6 * analytic


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, before any compile
# ----------------------------------------------------------------------------------------------------
def test_unknown_topology_one_line_from_the_command_line(tmp_path):
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dit-jax-train"), "--config",
                        os.path.join(ROOT, "configs", "default.py:S/2"), "--workdir", str(tmp_path / "w"),
                        "--compile-only", "--topology", "v9x:2x2"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    err = [l for l in r.stderr.splitlines() if ": error: " in l]
    assert r.returncode == 1 and len(err) == 1, r.stderr[-2000:]
    assert "unknown TPU topology 'v9x:2x2'" in err[0] and "v5e:16x16" in err[0] and "v4:4x4x8" in err[0]
    assert not os.path.exists(tmp_path / "w")


def test_libtpu_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)  # the name topology.py calls
    with pytest.raises(topology.TopologyError, match=r"needs libtpu, which is not installed.*\.\[tpu\]"):
        topology.tpu_topology("v5e:2x2")


def test_mesh_product_is_not_the_chip_count():
    c = _s2_latents(8)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
    with pytest.raises(shd.MeshError, match="needs 8 devices but 4 are in use"):
        compile_report.compile_for_topology(c, topology.tpu_topology("v5e:2x2"))


def test_batch_the_data_axes_do_not_divide():
    c = _s2_latents(6)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 1, 1
    with pytest.raises(ConfigError, match="micro-batch 6.*not divisible by the 4 data-parallel devices"):
        compile_report.compile_for_topology(c, topology.tpu_topology("v5e:2x2"))


# ----------------------------------------------------------------------------------------------------
# Real compiles (slow: 1-3 minutes each on 2 cores)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_s2_does_not_fit_v5e_2x2_exits_1_with_numbers(tmp_path):
    """The command line: a batch too big for 16 GiB per chip -> exit 1, the numbers and suggestions."""
    wd = tmp_path / "v5e"
    cmd = [sys.executable, "-m", "dit_jax.cli.train", "--config", os.path.join(ROOT, "configs", "default.py:S/2"),
           "--workdir", str(wd), "--compile-only", "--topology", "v5e:2x2", "--config.data.name=latents",
           f"--config.global_batch_size={S2_BIG_BATCH}", "--config.model.remat_policy=none"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "DOES NOT FIT" in r.stdout and "GiB" in r.stdout and "--config.model.remat_policy=full" in r.stdout
    rep = json.loads((wd / compile_report.REPORT_NAME).read_text())
    assert not rep["fits"] and rep["total_bytes_per_chip"] > 0.9 * rep["hbm_bytes_per_chip"]
    assert rep["hbm_bytes_per_chip"] == 16 * GIB and rep["chips"] == 4 and rep["hosts"] == 1
    assert rep["suggestions"]
    # Nothing fits: the search compiled the estimate's choice (all 4 chips on fsdp) and had nothing larger to try.
    assert [(r["fsdp"], r["fits"]) for r in rep["mesh_candidates"]] == [(4, False)]
    # libtpu refuses to return a program that does not fit; the temporaries then come from its message.
    assert not rep["compiled"] and rep["temp_bytes_per_chip"] > 16 * GIB, rep["notes"]


def test_compiler_oom_message_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(22.08G) exceeds available HBM (15.75G).")
    got = compile_report.compiler_oom(RuntimeError(msg))
    assert got["temp_bytes"] == int(22.08 * GIB) and "22.08G" in got["message"]
    assert compile_report.compiler_oom(RuntimeError("INVALID_ARGUMENT: bad sharding")) is None
    assert compile_report.compiler_oom(RuntimeError("RESOURCE_EXHAUSTED: no size here")) is None


S2_BIG_BATCH = 512  # DiT-S/2 float32 without remat: ~20 GiB per chip on 4 chips


@pytest.mark.slow
def test_s2_compiles_for_v4_megacore_and_state_bytes_add_up(tmp_path):
    topo = topology.tpu_topology("v4:2x2x1")
    assert topo.chips == 4 and topo.hosts == 1 and topo.megacore  # one device per chip, not per TensorCore
    cfg = _s2_latents(S2_BIG_BATCH)
    rep = compile_report.compile_for_topology(cfg, topo)
    assert rep["fits"] and rep["hbm_bytes_per_chip"] == 32 * GIB  # the same batch fits 32 GiB
    env = train.setup(cfg, devices=topo.devices, process_count=topo.hosts)
    assert rep["state_bytes_per_chip"]["total"] == _independent_state_bytes(env, topo.devices[0])
    st = rep["state_bytes_per_chip"]
    assert st["total"] == st["params"] + st["ema"] + st["optimizer"] and st["ema"] == st["params"]
    assert rep["temp_bytes_per_chip"] > 0 and rep["compile_seconds"] > 0
    assert "all-reduce" in rep["collectives"]  # data parallel: gradients are all-reduced
    assert rep["data_parallel_by_choice"] and rep["mesh"]["fsdp"] == 1  # auto: the state fits 32 GiB whole
    # config.mesh.plan="compile" (the default): the estimate's choice was compiled and fits; nothing smaller exists.
    assert [(r["fsdp"], r["fits"], r["compiled_bytes"]) for r in rep["mesh_candidates"]] == [
        (1, True, rep["total_bytes_per_chip"])]
    assert rep["mesh_candidates"][0]["moved_bytes_per_step"] == rep["collective_bytes_moved_per_chip_per_step"]
    assert rep["mesh"]["reason"].startswith("auto, by compiling candidates: fsdp=1")
    # mesh_plan's estimate (what "auto" chose the mesh by) against XLA's memory analysis of the same program:
    # "auto" multiplies the estimate by AUTO_MARGIN, so the program may need at most that much more; an
    # estimate above 2x would make auto shard far more than needed.
    est = rep["estimated_bytes_per_chip"]["total"]
    assert rep["total_bytes_per_chip"] <= mesh_plan.AUTO_MARGIN * est and est <= 2 * rep["total_bytes_per_chip"], (
        est, rep["total_bytes_per_chip"])


@pytest.mark.slow
def test_xl2_fsdp_256_compiles_on_v5e_16x16_and_fits():
    rep = compile_report.compile_for_topology(_xl2(fsdp=256), topology.tpu_topology("v5e:16x16"))
    assert rep["replicated_state_fraction"] < 0.01
    assert rep["state_per_chip_vs_even_split"] <= 1.25 and not rep["state_split"]["uneven"]
    assert rep["fits"]
    assert {"all-gather", "reduce-scatter"} & set(rep["collectives"])
