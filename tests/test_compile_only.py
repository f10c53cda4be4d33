"""--compile-only: the real training step compiled for TPU pods on this CPU (libtpu), and pod-scale sharding."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default, digits, dit_s2
from dit_jax import compile_report, mesh_plan, topology, train
from dit_jax import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
needs_libtpu = pytest.mark.skipif(not topology.libtpu_installed(), reason="needs libtpu: pip install -e '.[tpu]'")


def _s2_latents(batch):
    c = dit_s2.get_config()
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
    for x, s in zip(jax.tree_util.tree_leaves(env["abstract_state"]), jax.tree_util.tree_leaves(env["state_shardings"])):
        idx = s.devices_indices_map(tuple(x.shape))[device]
        shape = [len(range(*sl.indices(n))) for sl, n in zip(idx, x.shape)]
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------------------------------
# Pod-scale sharding (no compile: shardings and byte counts only)
# ----------------------------------------------------------------------------------------------------
@needs_libtpu
@pytest.mark.parametrize("pod", ["v5e:16x16", "v4:8x8x8"])  # 256 chips; 512 chips (v4 megacore)
def test_xl2_fsdp_over_all_chips_leaves_under_1_percent_replicated(pod):
    topo = topology.tpu_topology(pod)
    cfg = _xl2(fsdp=topo.chips)
    cfg.global_batch_size = max(256, topo.chips)  # at least one example per chip
    env = train.setup(cfg, "/nonexistent", devices=topo.devices, process_count=topo.hosts)
    acct = compile_report.state_accounting(env["abstract_state"], env["state_shardings"], topo.chips)
    assert acct["replicated_fraction"] < 0.01, acct["largest_replicated"][:3]
    assert acct["per_chip"]["total"] <= 1.25 * acct["total"]["total"] / topo.chips
    # The attention kernels (1152 x 3456, 1152 x 1152) are split over both of their dimensions.
    specs = shd.spec_tree(env["state_shardings"]["params"])
    qkv = specs["blocks_0/attn/qkv/kernel"]
    assert all(d is not None for d in qkv), qkv
    assert len(shd.fsdp_axes(env["mesh"])) > 1 and shd.axis_size(env["mesh"], "fsdp") == topo.chips
    assert _independent_state_bytes(env, topo.devices[0]) == acct["per_chip"]["total"]


def test_fsdp_groups_merge_primes_that_every_parameter_treats_alike():
    class Cfg:
        fsdp_min_size = 1
        logical_axis_rules = ()

    shapes = {"a": jax.ShapeDtypeStruct((1152, 3456), np.float32), "b": jax.ShapeDtypeStruct((4608,), np.float32)}
    assert shd.fsdp_groups(shapes, 256, Cfg) == (128, 2)  # 3456 takes 2^7, 1152 the last 2
    assert shd.fsdp_groups(shapes, 8, Cfg) == (8,)  # one dimension suffices: a plain fsdp axis
    assert shd.fsdp_groups(shapes, 1, Cfg) == (1,)


@needs_libtpu
def test_auto_mesh_on_v5e_256_and_on_cpu():
    topo = topology.tpu_topology("v5e:16x16")
    cfg = default.get_config()
    env = train.setup(cfg, "/nonexistent", devices=topo.devices, process_count=topo.hosts)
    plan = env["mesh_plan"]
    d, f, t = plan.shape
    assert d * f == 256 and t == 1 and 1 < f < 256 and "smallest fsdp" in plan.reason
    assert plan.estimate["total"] * mesh_plan.AUTO_MARGIN <= (1 - mesh_plan.HEADROOM) * topo.hbm_bytes
    # The digits config: 128 examples on 256 chips -> a tensor axis of 2 (data x fsdp must divide the batch).
    c = digits.get_config()
    c.mesh.num_devices = 0
    env = train.setup(c, "/nonexistent", devices=topo.devices, process_count=topo.hosts)
    assert env["mesh_plan"].shape[2] == 2 and "tensor=2" in env["mesh_plan"].reason
    # On CPU there is no memory limit to fit: plain data parallelism over the 8 test devices.
    c = digits.get_config()
    c.mesh.num_devices = 0
    assert train.setup(c, "/nonexistent")["mesh_plan"].shape == (8, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Analytic FLOPs and the HLO collectives parser
# ----------------------------------------------------------------------------------------------------
def test_forward_macs_match_the_paper():
    from dit_jax.model import DiT_models

    for name, px, paper in (("DiT-XL/2", 256, 118.64), ("DiT-XL/2", 512, 524.60), ("DiT-S/2", 256, 6.06)):
        got = compile_report.forward_macs(DiT_models[name](input_size=px // 8))["total"] / 1e9
        assert abs(got - paper) / paper < 0.01, (name, px, got)


def test_collectives_counts_loop_bodies_by_trip_count():
    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(28)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%x), dimensions={0}
  %ag = f32[8]{0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ag)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ar = (f32[8]{0}, bf16[4]{0}) all-reduce(%a, %a), to_apply=%add
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
    c = compile_report.collectives(hlo)
    assert c["all-reduce"] == {"count": 1, "bytes": 40, "count_per_step": 1, "bytes_per_step": 40}
    assert c["all-gather"] == {"count": 1, "bytes": 32, "count_per_step": 28, "bytes_per_step": 28 * 32}


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, before any compile
# ----------------------------------------------------------------------------------------------------
def _main_error(capsys, cfg, topo_name, tmp_path):
    rc = compile_report.main(cfg, str(tmp_path / "w"), topo_name)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not os.path.exists(tmp_path / "w" / compile_report.REPORT_NAME)
    return err


def test_unknown_topology(capsys, tmp_path):
    err = _main_error(capsys, _s2_latents(8), "v9x:2x2", tmp_path)
    assert "unknown TPU topology 'v9x:2x2'" in err and "v5e:16x16" in err and "v4:4x4x8" in err


def test_libtpu_missing_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
    err = _main_error(capsys, _s2_latents(8), "v5e:2x2", tmp_path)
    assert "needs libtpu, which is not installed" in err and ".[tpu]" in err


@needs_libtpu
def test_mesh_product_is_not_the_chip_count(capsys, tmp_path):
    c = _s2_latents(8)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
    err = _main_error(capsys, c, "v5e:2x2", tmp_path)
    assert "needs 8 devices but 4 are in use" in err


@needs_libtpu
def test_batch_the_data_axes_do_not_divide(capsys, tmp_path):
    c = _s2_latents(6)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 1, 1
    err = _main_error(capsys, c, "v5e:2x2", tmp_path)
    assert "micro-batch 6" in err and "not divisible by the 4 data-parallel devices" in err


# ----------------------------------------------------------------------------------------------------
# Real compiles (slow: 1-3 minutes each on 2 cores)
# ----------------------------------------------------------------------------------------------------
@needs_libtpu
@pytest.mark.slow
def test_s2_does_not_fit_v5e_2x2_exits_1_with_numbers(tmp_path):
    """The command line: a batch too big for 16 GiB per chip -> exit 1, the numbers and suggestions."""
    wd = tmp_path / "v5e"
    cmd = [sys.executable, "-m", "dit_jax.main", "--config", os.path.join(ROOT, "configs", "dit_s2.py"),
           "--workdir", str(wd), "--compile-only", "--topology", "v5e:2x2", "--config.data.name=latents",
           f"--config.global_batch_size={S2_BIG_BATCH}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "DOES NOT FIT" in r.stdout and "GiB" in r.stdout and "--config.model.remat=True" in r.stdout
    rep = json.loads((wd / compile_report.REPORT_NAME).read_text())
    assert not rep["fits"] and rep["total_bytes_per_chip"] > 0.9 * rep["hbm_bytes_per_chip"]
    assert rep["hbm_bytes_per_chip"] == 16 * GIB and rep["chips"] == 4 and rep["hosts"] == 1
    assert rep["suggestions"]


S2_BIG_BATCH = 512  # DiT-S/2 float32 without remat: ~20 GiB per chip on 4 chips


@needs_libtpu
@pytest.mark.slow
def test_s2_compiles_for_v4_megacore_and_state_bytes_add_up(tmp_path):
    topo = topology.tpu_topology("v4:2x2x1")
    assert topo.chips == 4 and topo.hosts == 1 and topo.megacore  # one device per chip, not per TensorCore
    cfg = _s2_latents(S2_BIG_BATCH)
    rep = compile_report.compile_for_topology(cfg, topo)
    assert rep["fits"] and rep["hbm_bytes_per_chip"] == 32 * GIB  # the same batch fits 32 GiB
    env = train.setup(cfg, "/nonexistent", devices=topo.devices, process_count=topo.hosts)
    assert rep["state_bytes_per_chip"]["total"] == _independent_state_bytes(env, topo.devices[0])
    st = rep["state_bytes_per_chip"]
    assert st["total"] == st["params"] + st["ema"] + st["optimizer"] and st["ema"] == st["params"]
    assert rep["temp_bytes_per_chip"] > 0 and rep["compile_seconds"] > 0
    assert rep["flops"]["train_flops_per_step"] == pytest.approx(
        6 * compile_report.forward_macs(env["model"])["total"] * S2_BIG_BATCH)
    assert "all-reduce" in rep["collectives"]  # data parallel: gradients are all-reduced


@needs_libtpu
@pytest.mark.slow
def test_xl2_fsdp_256_compiles_on_v5e_16x16_and_fits():
    rep = compile_report.compile_for_topology(_xl2(fsdp=256), topology.tpu_topology("v5e:16x16"))
    assert rep["replicated_state_fraction"] < 0.01
    assert rep["state_per_chip_vs_ideal"] <= 1.25
    assert rep["fits"]
    assert {"all-gather", "reduce-scatter"} & set(rep["collectives"])
