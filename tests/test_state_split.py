"""How evenly the state splits over the fsdp chips: pod sizes from abstract shapes, the warning at setup."""
import logging

import jax
import numpy as np
import pytest

from conftest import tiny_config
from configs import default
from dit_jax import train
from dit_jax.training import build
from dit_jax.analysis import state_split
from dit_jax import sharding as shd
from dit_jax.model import abstract_params


def _l2():
    c = default.get_config("L/2")
    return c, abstract_params(build.build_model(c))


def _hand_factor(params, fsdp: int, odd: int, min_size: int) -> float:
    """The issue's reasoning, written independently of dit_jax.sharding: fsdp = 2^k x odd; a parameter of at
    least min_size elements is split fsdp ways when one of its dimensions has the factor `odd`, else 2^k ways
    (every DiT-L/2 weight has a power-of-two width of 1024 or more); a smaller one is whole on every chip. The
    blocks' parameters are stacked (depth 24, which 3 divides): one block's shape decides."""
    per_chip = total = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        nb = float(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        block = x.shape[1:] if path[0].key == "blocks" else x.shape  # the stacked depth axis is never split
        if np.prod(block) < min_size:
            ways = 1
        else:
            ways = fsdp if any(d % odd == 0 for d in block) else fsdp // odd
        per_chip, total = per_chip + nb / ways, total + nb
    return per_chip / (total / fsdp)


@pytest.mark.parametrize("fsdp,odd,factor", [(96, 3, 2.0), (384, 3, 2.0), (640, 5, 5.0)])
def test_l2_fsdp_with_a_prime_no_width_has_is_reported(fsdp, odd, factor):
    cfg, params = _l2()
    rep = state_split.split_for_sizes(params, fsdp, cfg.sharding)  # an AbstractMesh: no devices needed
    assert rep["uneven"] and rep["chips_sharing_state"] == fsdp
    assert rep["factor"] == pytest.approx(_hand_factor(params, fsdp, odd, cfg.sharding.fsdp_min_size), rel=1e-9)
    assert abs(rep["factor"] - factor) < 0.05, rep["factor"]  # the 2.0x and 5x
    names = [e["name"] for e in rep["worst"]]
    assert "blocks/mlp/fc1/kernel" in names and "blocks/mlp/fc2/kernel" in names
    fc1 = rep["worst"][names.index("blocks/mlp/fc1/kernel")]
    assert fc1["split_ways"] == fsdp // odd and fc1["tensors"] == 1 and not fc1["below_fsdp_min_size"]
    text = state_split.describe(rep)
    assert f"{rep['factor']:.2f}x the even split" in text and "mlp/fc1/kernel (24, 1024, 4096)" in text
    assert "prime factors divide" in text


@pytest.mark.parametrize("fsdp", [2, 64, 256, 512])
def test_l2_fsdp_powers_of_two_split_evenly(fsdp):
    cfg, params = _l2()
    rep = state_split.split_for_sizes(params, fsdp, cfg.sharding)
    assert not rep["uneven"] and rep["factor"] < 1.01, rep["factor"]


def test_setup_warns_and_abstract_bytes_equal_the_device_shards(caplog):
    """fsdp 6 = 2 x 3 on 6 simulated devices: the width-32 kernels have no factor 3. The warning comes from
    train.setup; the per-chip bytes of the abstract computation equal each device's shards of the real mesh."""
    cfg = tiny_config()
    cfg.mesh.num_devices, cfg.mesh.data, cfg.mesh.fsdp = 6, 1, 6
    cfg.global_batch_size = 12
    with caplog.at_level(logging.WARNING, logger="dit_jax.train"):
        env = train.setup(cfg)
    warned = [r.getMessage() for r in caplog.records if "uneven state split" in r.getMessage()]
    assert len(warned) == 1 and "fsdp=6 (sub-axes 2x3)" in warned[0], caplog.text
    assert "blocks/mlp/fc1/kernel (1, 32, 128) split 2 of 6 ways" in warned[0]
    rep = state_split.split_report(env.abstract_state.params, env.mesh, cfg.sharding)
    p_sh = env.state_shardings.params
    for dev in env.mesh.devices.flat:
        got = 0
        for x, s in zip(jax.tree_util.tree_leaves(env.abstract_state.params), jax.tree_util.tree_leaves(p_sh)):
            idx = s.devices_indices_map(tuple(x.shape))[dev]
            got += int(np.prod([len(range(*sl.indices(n))) for sl, n in zip(idx, x.shape)])) * x.dtype.itemsize
        assert got == rep["param_bytes_per_chip"]
    abstract = state_split.split_for_sizes(env.abstract_state.params, 6, cfg.sharding)
    assert abstract["factor"] == rep["factor"] > state_split.UNEVEN_LIMIT


def test_no_warning_when_the_split_is_even(caplog):
    cfg = tiny_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.sharding.fsdp_min_size = 1  # every parameter sharded: the tiny biases would otherwise dominate
    with caplog.at_level(logging.WARNING, logger="dit_jax.train"):
        env = train.setup(cfg)
    assert "uneven state split" not in caplog.text
    assert state_split.split_report(env.abstract_state.params, env.mesh, cfg.sharding)["factor"] < 1.1


def test_small_parameters_get_the_fsdp_min_size_advice():
    cfg = default.get_config("S/2")
    params = abstract_params(build.build_model(cfg))
    rep = state_split.split_for_sizes(params, 512, cfg.sharding)  # S/2 biases of 384 elements, whole on 512 chips
    assert rep["uneven"] and all(e["below_fsdp_min_size"] for e in rep["worst"][:2])
    assert "fsdp_min_size" in state_split.describe(rep)


def test_abstract_mesh_has_the_real_mesh_axes():
    assert shd.abstract_mesh((2, 96, 1), (32, 3)).axis_names == ("data", "fsdp_0", "fsdp_1", "tensor")
    with pytest.raises(shd.MeshError, match="do not multiply"):
        shd.abstract_mesh((1, 96, 1), (32, 2))
