"""sharding.make_mesh: the topology's device order on TPU (compile-only devices from libtpu), the given order
on CPU, and an error, never a silent plain order, when the topology-aware layout fails."""
import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from dit_jax import sharding as shd, topology

NAMES = ("data", "fsdp", "tensor")


def ids(devices):
    return [d.id for d in np.asarray(devices).flat]


def test_v5e_pod_mesh_has_the_order_of_jax_make_mesh():
    """(128, 2, 1) is what the auto plan picks for DiT-XL/2 on v5e:16x16. It needs a physical axis split, so
    mesh_utils.create_device_mesh's default refused it and make_mesh fell back to the plain order."""
    devices = topology.tpu_topology("v5e:16x16").devices
    want = jax.make_mesh((128, 2, 1), NAMES, devices=devices).devices
    assert ids(want) != ids(devices)  # the topology order is not the plain one: the check can fail
    got = shd.make_mesh((128, 2, 1), devices)
    assert ids(got.devices) == ids(want)
    assert got.devices.shape == (128, 2, 1) and got.axis_names == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("shape", [(16, 4, 1), (4, 16, 1)])
def test_v4_mesh_has_the_order_of_jax_make_mesh(shape):
    devices = topology.tpu_topology("v4:4x4x4").devices
    assert ids(shd.make_mesh(shape, devices).devices) == ids(jax.make_mesh(shape, NAMES, devices=devices).devices)


def test_v4_mesh_that_needs_a_split_axis_keeps_a_topology_order():
    """jax.make_mesh refuses (8, 8, 1) on a 4x4x4 v4 slice (it splits physical axes only on v5e); make_mesh
    splits one (mesh_utils, allow_split_physical_axes) instead of giving up on the topology."""
    devices = topology.tpu_topology("v4:4x4x4").devices
    with pytest.raises(NotImplementedError):
        jax.make_mesh((8, 8, 1), NAMES, devices=devices)
    got = shd.make_mesh((8, 8, 1), devices)
    assert ids(got.devices) == ids(mesh_utils.create_device_mesh((8, 8, 1), devices, allow_split_physical_axes=True))
    assert sorted(ids(got.devices)) == sorted(ids(devices))


def test_a_failing_topology_layout_is_an_error_not_a_plain_order(monkeypatch):
    devices = topology.tpu_topology("v5e:2x2").devices

    def refuse(*args, **kwargs):
        raise ValueError("planted: no layout")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)  # JAX's layout, not ours
    with pytest.raises(shd.MeshError, match=r"cannot lay out mesh data=2, fsdp=2, tensor=1 over 4 TPU v5 lite "
                                            r"devices in topology order: planted: no layout"):
        shd.make_mesh((2, 2, 1), devices)


def test_cpu_devices_keep_their_order_and_subsets_work():
    cpus = jax.devices("cpu")
    assert ids(shd.make_mesh((1, 2, 1), cpus[:2]).devices) == ids(cpus[:2])
    mesh = shd.make_mesh((2, 4, 1), cpus[::-1], fsdp_group_sizes=(2, 2))
    assert ids(mesh.devices) == ids(cpus[::-1]) and mesh.axis_names == ("data", "fsdp_0", "fsdp_1", "tensor")
