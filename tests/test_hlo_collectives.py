"""Collectives of compiled programs: kinds, group sizes and bytes moved per chip against hand-computed numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import tiny_config
from dit_jax import compile_report, topology
from dit_jax.analysis.collectives import collectives, collectives_by_op, group_size, moved_bytes_per_step

try:
    from jax import shard_map
except ImportError:  # jax 0.10 keeps it in experimental
    from jax.experimental.shard_map import shard_map

F32 = 4


def _mesh(where):
    """2 x 4 mesh ("a", "b") of a compile-only v5e:2x4 (8 chips) or of the 8 simulated CPU devices."""
    devs = topology.tpu_topology("v5e:2x4").devices if where == "tpu" else jax.devices()[:8]
    return Mesh(np.asarray(devs).reshape(2, 4), ("a", "b"))


def _compile(fn, mesh, *shapes, spec=P("a", "b")):
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, spec)) for s in shapes]
    return jax.jit(fn).lower(*args).compile().as_text()


def _strip(c):
    return {k: {f: v[f] for f in ("count", "count_per_step", "result_bytes_per_step", "moved_bytes_per_step",
                                  "group_sizes")} for k, v in c.items()}


@pytest.mark.parametrize("where", ["tpu", "cpu"])
def test_each_kind_of_an_explicit_program(where):
    """One collective of each kind written with shard_map (per-chip blocks below); the ring bytes by hand."""
    mesh = _mesh(where)

    def body(x, y, z, w, p):
        g = jax.lax.all_gather(x, "b", tiled=True)  # (128, 64) -> (512, 64), n = 4
        s = jax.lax.psum(y, "a")  # (64, 64), n = 2
        rs = jax.lax.psum_scatter(z, "b", scatter_dimension=0, tiled=True)  # (256, 64) -> (64, 64), n = 4
        a2a = jax.lax.all_to_all(w, "b", 0, 1, tiled=True)  # (128, 64) -> (32, 256), n = 4
        pp = jax.lax.fori_loop(0, 3, lambda i, q: jax.lax.ppermute(q * 1.5, "a", [(0, 1), (1, 0)]), p)  # (32, 32) x 3
        return g, s, rs, a2a, pp

    f = shard_map(body, mesh=mesh, in_specs=(P("a", "b"),) * 5, out_specs=(P("a", "b"),) * 5)
    blocks = [(128, 64), (64, 64), (256, 64), (128, 64), (32, 32)]
    got = _strip(collectives(_compile(f, mesh, *[(2 * r, 4 * c) for r, c in blocks])))
    assert got == {
        "all-gather": {"count": 1, "count_per_step": 1, "result_bytes_per_step": 512 * 64 * F32,
                       "moved_bytes_per_step": 3 * 128 * 64 * F32, "group_sizes": [4]},  # (n-1)/n x result
        "all-reduce": {"count": 1, "count_per_step": 1, "result_bytes_per_step": 64 * 64 * F32,
                       "moved_bytes_per_step": 64 * 64 * F32, "group_sizes": [2]},  # 2 (n-1)/n x buffer
        "reduce-scatter": {"count": 1, "count_per_step": 1, "result_bytes_per_step": 64 * 64 * F32,
                           "moved_bytes_per_step": 3 * 64 * 64 * F32, "group_sizes": [4]},  # (n-1) x result
        "all-to-all": {"count": 1, "count_per_step": 1, "result_bytes_per_step": 32 * 256 * F32,
                       "moved_bytes_per_step": 3 * 32 * 64 * F32, "group_sizes": [4]},  # (n-1)/n x buffer
        "collective-permute": {"count": 1, "count_per_step": 3, "result_bytes_per_step": 3 * 32 * 32 * F32,
                               "moved_bytes_per_step": 3 * 32 * 32 * F32, "group_sizes": []},  # the buffer, 3 times
    }


def test_partitioner_reduce_scatter_fusion_on_tpu():
    """The SPMD partitioner's own collectives: a weight all-gather and libtpu's reduce-scatter fusion
    (an all-reduce and a dynamic-slice in one fusion) counted as the reduce-scatter it is."""
    mesh = _mesh("tpu")
    s = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731

    def f(x, w):
        h = jnp.tanh(jnp.dot(x, w, precision="highest"))  # w (512, 1024) split over "b": gathered, f32
        h = jax.lax.with_sharding_constraint(h, s(("a", "b"), None))
        g = jnp.dot(h.T, h, precision="highest")  # (1024, 1024) partial sums on each chip
        return jax.lax.with_sharding_constraint(g, s(("a", "b"), None))  # summed and split over all 8

    args = (jax.ShapeDtypeStruct((2048, 512), jnp.float32, sharding=s(("a", "b"), None)),
            jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=s("b", None)))
    text = jax.jit(f).lower(*args).compile().as_text()
    assert "all-reduce-scatter" in text  # the fused form this test is about
    got = _strip(collectives(text))
    assert got["reduce-scatter"] == {"count": 1, "count_per_step": 1, "result_bytes_per_step": 128 * 1024 * F32,
                                     "moved_bytes_per_step": 7 * 128 * 1024 * F32, "group_sizes": [8]}
    assert got["all-gather"] == {"count": 1, "count_per_step": 1, "result_bytes_per_step": 512 * 1024 * F32,
                                 "moved_bytes_per_step": 3 * 128 * 1024 * F32, "group_sizes": [4]}
    assert set(got) == {"reduce-scatter", "all-gather"}
    # Where the bytes come from: the fused reduce-scatter carries the name of its fusion (the h.T @ h matmul).
    by_op = collectives_by_op(text)
    assert [(o["kind"], o["moved_bytes_per_step"]) for o in by_op] == [("reduce-scatter", 7 * 128 * 1024 * F32),
                                                                      ("all-gather", 3 * 128 * 1024 * F32)]
    assert all("dot_general" in o["op_name"] and not o["op_name"].startswith("jit(") for o in by_op), by_op


def test_data_parallel_step_all_reduces_every_gradient_once():
    """A data-parallel training step on v5e:2x4: each chip sends 2 (n-1)/n x the float32 gradients (all the
    parameters) plus the loss scalars, n = 8."""
    cfg = tiny_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 8, 1, 1
    rep = compile_report.compile_for_topology(cfg, topology.tpu_topology("v5e:2x4"))
    grads = rep["state_bytes_total"]["params"]
    assert set(rep["collectives"]) == {"all-reduce"}
    ar = rep["collectives"]["all-reduce"]
    assert ar["group_sizes"] == [8] and ar["group_size_unknown"] == 0
    assert abs(ar["moved_bytes_per_step"] - 2 * 7 / 8 * grads) <= 64, (ar, grads)  # + a few metric scalars
    assert rep["collective_bytes_moved_per_chip_per_step"] == ar["moved_bytes_per_step"]


def test_overlapped_all_gather_counted_once():
    """libtpu spreads one all-gather over a start fusion, continuation fusions inside matmuls and a done
    fusion, each holding a copy of it (trimmed from a compiled DiT step); it is one collective."""
    hlo = """HloModule m, num_partitions=8

%start_comp (p0: bf16[3,64,384]) -> (bf16[3,64,384], bf16[6,64,384]) {
  %p0 = bf16[3,64,384]{2,1,0} parameter(0)
  %all-gather.1 = bf16[6,64,384]{2,1,0} all-gather(%p0), channel_id=15, replica_groups=[4,2]<=[8], dimensions={0}
  ROOT %cc = (bf16[3,64,384]{2,1,0}, bf16[6,64,384]{2,1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%cont_comp (p0: bf16[3,64,384], p1: f32[8,8]) -> (f32[8,8], bf16[6,64,384]) {
  %p0 = bf16[3,64,384]{2,1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %all-gather.2 = bf16[6,64,384]{2,1,0} all-gather(%p0), channel_id=15, replica_groups=[4,2]<=[8], dimensions={0}
  ROOT %t = (f32[8,8]{1,0}, bf16[6,64,384]{2,1,0}) tuple(%p1, %all-gather.2)
}

%done_comp (p0: bf16[3,64,384], p1: bf16[6,64,384]) -> bf16[6,64,384] {
  %p0 = bf16[3,64,384]{2,1,0} parameter(0)
  %p1 = bf16[6,64,384]{2,1,0} parameter(1)
  %all-gather.3 = bf16[6,64,384]{2,1,0} all-gather(%p0), channel_id=15, replica_groups=[4,2]<=[8], dimensions={0}
  ROOT %cc = bf16[6,64,384]{2,1,0} custom-call(%p0, %p1, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (a: bf16[3,64,384], b: f32[8,8]) -> bf16[6,64,384] {
  %a = bf16[3,64,384]{2,1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %async-collective-start = (bf16[3,64,384]{2,1,0}, bf16[6,64,384]{2,1,0}) fusion(%a), kind=kCustom, calls=%start_comp
  %fusion.5 = (f32[8,8]{1,0}, bf16[6,64,384]{2,1,0}) fusion(%a, %b), kind=kOutput, calls=%cont_comp, backend_config={"continuation_config":{"operand_original_start":"0"}}
  %g = bf16[6,64,384]{2,1,0} get-tuple-element(%fusion.5), index=1
  ROOT %async-collective-done = bf16[6,64,384]{2,1,0} fusion(%a, %g), kind=kCustom, calls=%done_comp
}
"""
    got = collectives(hlo)
    assert got["all-gather"]["count_per_step"] == 1 and got["all-gather"]["group_sizes"] == [2]
    assert got["all-gather"]["moved_bytes_per_step"] == 3 * 64 * 384 * 2  # (n-1)/n x result, bf16


def test_loop_bodies_count_by_trip_count():
    hlo = """HloModule m, num_partitions=4

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(28)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ag = f32[8]{0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ag)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ar = (f32[8]{0}, bf16[4]{0}) all-reduce(%a, %a), channel_id=2, replica_groups={}, to_apply=%add
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
    c = collectives(hlo)
    # replica_groups={} is every device: num_partitions=4.
    assert c["all-reduce"] == {"count": 1, "count_per_step": 1, "result_bytes": 40, "result_bytes_per_step": 40,
                               "moved_bytes_per_step": 60, "group_sizes": [4], "group_size_unknown": 0}
    assert c["all-gather"] == {"count": 1, "count_per_step": 28, "result_bytes": 32, "result_bytes_per_step": 28 * 32,
                               "moved_bytes_per_step": 28 * 24, "group_sizes": [4], "group_size_unknown": 0}
    assert moved_bytes_per_step(c) == 60 + 28 * 24


def test_group_size_spellings():
    assert group_size("replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}", 8) == 2
    assert group_size("replica_groups={}, to_apply=%add", 8) == 8
    assert group_size("replica_groups=[4,2]<=[8], dimensions={0}", 8) == 2
    assert group_size("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}", 8) == 4
    assert group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_1'}, dimensions={1}", 8) == 2
    assert group_size("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
                      "{'axis_0'}, dimensions={0}", 8) == 4
    assert group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}", 8) == 8
    assert group_size("replica_groups=mesh['axis_0'=8] {'axis_0':(2)4}, dimensions={0}", 8) == 4
    assert group_size("source_target_pairs={{0,1},{1,0}}", 8) is None
