"""Device mesh and parameter/batch shardings from the config.

Mesh axes are ("data", "fsdp", "tensor"). Parameters are placed in two passes:
1. logical axis rules: a few DiT weights carry logical axis names (PARAM_AXES, e.g. the qkv kernel's
   output axis is "heads"); `config.sharding.logical_axis_rules` maps names to mesh axes ("heads" ->
   "tensor"). A mesh axis of size 1 or a dimension it does not divide leaves that dimension unsharded.
2. FSDP: every parameter with at least `fsdp_min_size` elements is also sharded over "fsdp" along its
   largest dimension that "fsdp" divides and pass 1 left free (replicated if there is none).
The optimizer state and the EMA get the same shardings as the parameters they track. Batches are sharded
along their first axis over ("data", "fsdp").
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.utils.errors import DitJaxError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical names of the dimensions of some DiT parameters: (regex on the "/"-joined path, names per dim).
# Megatron-style pairs: column-parallel qkv/fc1 (output split), row-parallel proj/fc2 (input split).
PARAM_AXES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    (r"attn/qkv/kernel$", ("embed", "heads")),
    (r"attn/qkv/bias$", ("heads",)),
    (r"attn/proj/kernel$", ("heads", "embed")),
    (r"mlp/fc1/kernel$", ("embed", "mlp")),
    (r"mlp/fc1/bias$", ("mlp",)),
    (r"mlp/fc2/kernel$", ("mlp", "embed")),
)


class MeshError(DitJaxError, ValueError):
    pass


def mesh_shape(mesh_cfg, num_devices: int) -> Tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with at most one -1 filled in; an error names what does not fit."""
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    desc = f"mesh data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}"
    if sum(s == -1 for s in sizes) > 1:
        raise MeshError(f"{desc}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"{desc}: axis sizes must be positive (or -1 for 'the rest')")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"{desc} does not fit {num_devices} devices: {num_devices} is not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise MeshError(f"{desc} needs {int(np.prod(sizes))} devices but {num_devices} are in use "
                        f"(set config.mesh.* so the product is {num_devices}, or one axis to -1)")
    return tuple(sizes)


def make_mesh(mesh_cfg) -> Mesh:
    """Mesh over all devices (or the first `num_devices` in a single process)."""
    devices = jax.devices()
    n = int(mesh_cfg.get("num_devices", 0) or 0)
    if n:
        if jax.process_count() > 1:
            raise MeshError("config.mesh.num_devices is for single-process runs; leave it 0 with several processes")
        if n > len(devices):
            raise MeshError(f"config.mesh.num_devices={n} but only {len(devices)} devices exist")
        devices = devices[:n]
    shape = mesh_shape(mesh_cfg, len(devices))
    try:  # topology-aware device order on TPU/GPU; plain order otherwise
        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001  (CPU subsets and odd shapes)
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Tuple[str, Optional[str]]],
               fsdp_min_size: int) -> P:
    """PartitionSpec of one parameter (see the module docstring)."""
    spec: list = [None] * len(shape)
    rule_map = dict(rules)
    for pattern, names in PARAM_AXES:
        if re.search(pattern, path) and len(names) == len(shape):
            for i, name in enumerate(names):
                axis = rule_map.get(name)
                if axis and mesh.shape.get(axis, 1) > 1 and shape[i] % mesh.shape[axis] == 0:
                    spec[i] = axis
            break
    f = mesh.shape.get("fsdp", 1)
    if f > 1 and int(np.prod(shape)) >= fsdp_min_size:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % f == 0]
        if free:
            i = max(free, key=lambda j: (shape[j], -j))  # largest dimension, the first on ties
            spec[i] = "fsdp"
    while spec and spec[-1] is None:  # P(None, "fsdp") stays, P(None) becomes P()
        spec.pop()
    return P(*spec)


def param_shardings(params_shapes: Any, mesh: Mesh, sharding_cfg) -> Any:
    """Tree of NamedSharding matching a tree of arrays / ShapeDtypeStructs of DiT parameters."""
    rules = tuple(tuple(r) for r in sharding_cfg.logical_axis_rules)
    for name, axis in rules:
        if axis is not None and axis not in MESH_AXES:
            raise MeshError(f"config.sharding.logical_axis_rules maps {name!r} to {axis!r}, "
                            f"not a mesh axis {MESH_AXES}")
    min_size = int(sharding_cfg.fsdp_min_size)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_path_str(path), x.shape, mesh, rules, min_size)),
        params_shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch_from_local(local: Dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> Dict[str, jax.Array]:
    """Each process passes only its slice of the batch; returns global arrays sharded over BATCH_AXES."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
    return out


def spec_tree(shardings: Any) -> Dict[str, P]:
    """{"path/to/param": PartitionSpec} for logging and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {_path_str(p): s.spec for p, s in flat}
