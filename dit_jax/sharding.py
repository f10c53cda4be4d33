"""Device mesh and parameter/batch shardings from the config.

The logical mesh axes are ("data", "fsdp", "tensor"). Parameters are placed in two passes:
1. logical axis rules: a few DiT weights carry logical axis names (PARAM_AXES, e.g. the qkv kernel's
   output axis is "heads"); `config.sharding.logical_axis_rules` maps names to mesh axes ("heads" ->
   "tensor"). A mesh axis of size 1 or a dimension it does not divide leaves that dimension unsharded.
2. FSDP: every parameter with at least `fsdp_min_size` elements is also sharded over "fsdp", over the
   dimensions pass 1 left free.

Why the fsdp axis may be factored: a parameter can only be split evenly, and at pod scale no single
dimension of some DiT weights is divisible by the fsdp size (DiT-XL/2's qkv kernel is 1152 x 3456 =
2^7*9 x 2^7*27; neither is divisible by 256, their product is). So the fsdp axis of the `Mesh` is built as
consecutive sub-axes ("fsdp_0", "fsdp_1", ...; a single one is named "fsdp") whose sizes multiply to the
fsdp size, and each parameter spreads the sub-axes over its free dimensions: the qkv kernel on 256 chips
gets P("fsdp_1", "fsdp_0") with sub-axes (128, 2). The sub-axis sizes come from the parameter shapes
(`fsdp_groups`): the fsdp size is split into primes, each parameter assigns the primes greedily (to the
dimension the previous prime went to while it divides, else to the largest free dimension it divides;
this reaches the largest shard count an even split allows), and neighbouring primes that every parameter
treats alike are merged. The sub-axes are a reshape of the one fsdp axis of the device array, so their
product in order is exactly the device order a plain fsdp axis would have.

The blocks' parameters are stacked (`blocks/attn/qkv/kernel` is (depth, D, 3D), dit_jax/nn/param_layout.py):
their leading depth axis is never sharded (the scan over the blocks slices it), and both passes treat the
rest of the shape as they would one block's parameter.

The optimizer state and the EMA get the same shardings as the parameters they track. Batches are sharded
along their first axis over ("data", fsdp sub-axes...).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from dit_jax.utils.errors import DitJaxError

MESH_AXES = ("data", "fsdp", "tensor")  # logical axes; "fsdp" may be several sub-axes in the Mesh

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


# Parameters with a leading depth axis (one slice per block): the stacked blocks.
STACKED_PATH = re.compile(r"(^|/)blocks/")


class MeshError(DitJaxError, ValueError):
    pass


# ----------------------------------------------------------------------------------------------------
# Mesh axes
# ----------------------------------------------------------------------------------------------------
def fsdp_axes(mesh: Mesh) -> Tuple[str, ...]:
    """The mesh axes that together form the logical fsdp axis, in device order."""
    return tuple(a for a in mesh.axis_names if a == "fsdp" or a.startswith("fsdp_"))


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of a logical axis ("fsdp" is the product of its sub-axes; 1 when absent)."""
    if name == "fsdp":
        return int(np.prod([mesh.shape[a] for a in fsdp_axes(mesh)], dtype=np.int64))
    return int(mesh.shape.get(name, 1))


def logical_shape(mesh: Mesh) -> Dict[str, int]:
    """{"data": d, "fsdp": f, "tensor": t} whatever the fsdp factoring."""
    return {a: axis_size(mesh, a) for a in MESH_AXES}


def batch_axes(mesh: Mesh) -> Tuple[str, ...]:
    return ("data",) + fsdp_axes(mesh)


def describe_mesh(sizes: Sequence[int]) -> str:
    show = ["auto" if s is None else str(s) for s in sizes]
    return f"mesh data={show[0]}, fsdp={show[1]}, tensor={show[2]}"


def mesh_shape(mesh_cfg, num_devices: int) -> Tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of an explicit mesh config with at most one -1 filled in.

    An error names what does not fit. Axes left None ("auto") are resolved by dit_jax.mesh_plan first."""
    sizes = [None if v is None else int(v) for v in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)]
    desc = describe_mesh(sizes)
    if None in sizes:
        raise MeshError(f"{desc}: resolve the auto axes first (dit_jax.mesh_plan)")
    if sum(s == -1 for s in sizes) > 1:
        raise MeshError(f"{desc}: at most one axis may be -1")
    if any(s < -1 or s == 0 for s in sizes):
        raise MeshError(f"{desc}: axis sizes must be positive, -1 for 'the rest' or unset (None) for 'auto'")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"{desc} does not fit {num_devices} devices: {num_devices} is not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise MeshError(f"{desc} needs {int(np.prod(sizes))} devices but {num_devices} are in use "
                        f"(set config.mesh.* so the product is {num_devices}, or one axis to -1)")
    return tuple(sizes)


def select_devices(mesh_cfg, devices: Optional[Sequence[Any]] = None, process_count: Optional[int] = None) -> list:
    """All devices (or the first `config.mesh.num_devices` in a single process)."""
    devices = list(jax.devices() if devices is None else devices)
    n = int(mesh_cfg.get("num_devices", 0) or 0)
    if n:
        if (jax.process_count() if process_count is None else process_count) > 1:
            raise MeshError("config.mesh.num_devices is for single-process runs; leave it unset with several processes")
        if n > len(devices):
            raise MeshError(f"config.mesh.num_devices={n} but only {len(devices)} devices exist")
        devices = devices[:n]
    return devices


def device_order(shape: Tuple[int, int, int], devices: Sequence[Any]) -> np.ndarray:
    """`devices` arranged as `shape` (data, fsdp, tensor), the last axis the one with the most traffic.

    CPU devices have no interconnect topology: their order as given is the mesh order (any subset works).
    TPU and GPU get the topology-aware order of jax.make_mesh (mesh_utils.create_device_mesh, physical axes
    split where a logical axis needs it, as jax.make_mesh does on v5e; where jax.make_mesh succeeds the
    order is the same). A failure there is an error naming the shape and the devices, never a silent plain
    order: a wrong order still runs, only slower."""
    platforms = {d.platform for d in devices}
    if platforms == {"cpu"}:
        return np.asarray(devices).reshape(shape)
    try:
        return mesh_utils.create_device_mesh(shape, devices=list(devices), allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
        kinds = sorted({d.device_kind for d in devices})
        raise MeshError(f"cannot lay out {describe_mesh(shape)} over {len(devices)} {'/'.join(kinds)} devices in "
                        f"topology order: {' '.join(str(e).split())}") from e


def make_mesh(mesh_cfg_or_shape, devices: Optional[Sequence[Any]] = None,
              fsdp_group_sizes: Optional[Sequence[int]] = None) -> Mesh:
    """Mesh over `devices` (default: all, or config.mesh.num_devices of them).

    mesh_cfg_or_shape: config.mesh (explicit sizes, -1 allowed) or a resolved (data, fsdp, tensor).
    fsdp_group_sizes: the fsdp sub-axis sizes (see `fsdp_groups`); default: one fsdp axis."""
    if isinstance(mesh_cfg_or_shape, (tuple, list)):
        shape = tuple(int(s) for s in mesh_cfg_or_shape)
        devices = list(jax.devices() if devices is None else devices)
        if int(np.prod(shape)) != len(devices):
            raise MeshError(f"{describe_mesh(shape)} needs {int(np.prod(shape))} devices but {len(devices)} are in use")
    else:
        devices = select_devices(mesh_cfg_or_shape, devices)
        shape = mesh_shape(mesh_cfg_or_shape, len(devices))
    groups = tuple(int(g) for g in (fsdp_group_sizes or (shape[1],)))
    if int(np.prod(groups)) != shape[1]:
        raise MeshError(f"fsdp sub-axes {groups} do not multiply to the fsdp size {shape[1]}")
    dev_array = device_order(shape, devices)
    dev_array = dev_array.reshape((shape[0],) + groups + (shape[2],))  # split the fsdp axis in device order
    return Mesh(dev_array, _axis_names(groups))


def abstract_mesh(shape: Sequence[int], fsdp_group_sizes: Optional[Sequence[int]] = None) -> AbstractMesh:
    """The axes of `make_mesh(shape, ..., fsdp_group_sizes)` without devices: shardings and shard shapes of a
    mesh of any size can be worked out on any machine."""
    groups = tuple(int(g) for g in (fsdp_group_sizes or (shape[1],)))
    if int(np.prod(groups)) != int(shape[1]):
        raise MeshError(f"fsdp sub-axes {groups} do not multiply to the fsdp size {shape[1]}")
    return AbstractMesh((int(shape[0]),) + groups + (int(shape[2]),), _axis_names(groups))


def _axis_names(groups: Sequence[int]) -> Tuple[str, ...]:
    names = ("fsdp",) if len(groups) == 1 else tuple(f"fsdp_{i}" for i in range(len(groups)))
    return ("data",) + names + ("tensor",)


# ----------------------------------------------------------------------------------------------------
# Parameter specs
# ----------------------------------------------------------------------------------------------------
def path_str(path) -> str:
    """A jax tree path as "a/b/0/c" (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _prime_factors(n: int) -> List[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def stacked_dims(path: str) -> int:
    """How many leading dimensions of the parameter at `path` index blocks (1 for `blocks/...`, else 0);
    no rule or fsdp group ever shards them."""
    return 1 if STACKED_PATH.search(path) else 0


def _rule_spec(path: str, shape: Sequence[int], sizes: Dict[str, int],
               rules: Sequence[Tuple[str, Optional[str]]]) -> list:
    """Pass 1: logical axis rules -> one mesh axis name (or None) per dimension of one block's parameter
    (`shape` without the stacked depth axis)."""
    spec: list = [None] * len(shape)
    rule_map = dict(rules)
    for pattern, names in PARAM_AXES:
        if re.search(pattern, path) and len(names) == len(shape):
            for i, name in enumerate(names):
                axis = rule_map.get(name)
                if axis and sizes.get(axis, 1) > 1 and shape[i] % sizes[axis] == 0:
                    spec[i] = axis
            break
    return spec


def _assign(shape: Sequence[int], free: Sequence[int], groups: Sequence[int]) -> List[Optional[int]]:
    """Pass 2: the dimension each fsdp group shards (None: the parameter is replicated over that group).

    Greedy in group order: the previous group's dimension while the group divides what is left of it, else
    the free dimension with the most left that the group divides (the first on ties)."""
    left = {i: int(shape[i]) for i in free}
    out: List[Optional[int]] = []
    prev = None
    for g in groups:
        if prev is not None and left[prev] % g == 0:
            dim = prev
        else:
            ok = [i for i in free if left[i] % g == 0]
            dim = max(ok, key=lambda j: (left[j], -j)) if ok else None
        if dim is not None:
            left[dim] //= g
            prev = dim
        out.append(dim)
    return out


def _fsdp_eligible(shape: Sequence[int], fsdp_min_size: int) -> bool:
    return int(np.prod(shape, dtype=np.int64)) >= fsdp_min_size


def fsdp_groups(param_shapes: Any, fsdp_size: int, sharding_cfg, tensor_size: int = 1) -> Tuple[int, ...]:
    """Sizes of the fsdp sub-axes for these parameters (product = fsdp_size; see the module docstring)."""
    if fsdp_size <= 1:
        return (max(int(fsdp_size), 1),)
    primes = _prime_factors(int(fsdp_size))
    rules = _rules(sharding_cfg)
    sizes = {"fsdp": int(fsdp_size), "tensor": int(tensor_size)}
    min_size = int(sharding_cfg.fsdp_min_size)
    columns = []  # per parameter: the dimension of each prime
    for path, x in jax.tree_util.tree_flatten_with_path(param_shapes)[0]:
        path = path_str(path)
        shape = tuple(x.shape)[stacked_dims(path):]
        if not _fsdp_eligible(shape, min_size):
            continue
        spec = _rule_spec(path, shape, sizes, rules)
        columns.append(_assign(shape, [i for i in range(len(shape)) if spec[i] is None], primes))
    groups = [primes[0]]
    for k in range(1, len(primes)):
        if all(c[k] == c[k - 1] for c in columns):  # every parameter puts prime k where it put prime k-1
            groups[-1] *= primes[k]
        else:
            groups.append(primes[k])
    return tuple(groups)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Tuple[str, Optional[str]]],
               fsdp_min_size: int) -> P:
    """PartitionSpec of one parameter (see the module docstring); a stacked one's depth axis stays whole."""
    lead = stacked_dims(path)
    shape = tuple(shape)[lead:]
    spec = _rule_spec(path, shape, {"tensor": axis_size(mesh, "tensor")}, rules)
    f_axes = fsdp_axes(mesh)
    if axis_size(mesh, "fsdp") > 1 and _fsdp_eligible(shape, fsdp_min_size):
        free = [i for i in range(len(shape)) if spec[i] is None]
        dims = _assign(shape, free, [mesh.shape[a] for a in f_axes])
        per_dim: Dict[int, list] = {}
        for a, d in zip(f_axes, dims):
            if d is not None and mesh.shape[a] > 1:
                per_dim.setdefault(d, []).append(a)
        for d, names in per_dim.items():
            spec[d] = names[0] if len(names) == 1 else tuple(names)
    spec = [None] * lead + spec
    while spec and spec[-1] is None:  # P(None, "fsdp") stays, P(None) becomes P()
        spec.pop()
    return P(*spec)


def _rules(sharding_cfg) -> Tuple[Tuple[str, Optional[str]], ...]:
    rules = tuple(tuple(r) for r in sharding_cfg.logical_axis_rules)
    for name, axis in rules:
        if axis is not None and axis != "tensor":
            raise MeshError(f"config.sharding.logical_axis_rules maps {name!r} to {axis!r}; a logical name maps "
                            f"to 'tensor' or None (fsdp shards every large parameter anyway)")
    return rules


def param_shardings(params_shapes: Any, mesh: Mesh, sharding_cfg) -> Any:
    """Tree of NamedSharding matching a tree of arrays / ShapeDtypeStructs of DiT parameters."""
    rules = _rules(sharding_cfg)
    min_size = int(sharding_cfg.fsdp_min_size)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path_str(path), x.shape, mesh, rules, min_size)),
        params_shapes)


# ----------------------------------------------------------------------------------------------------
# Batches and helpers
# ----------------------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def global_batch_from_local(local: Dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> Dict[str, jax.Array]:
    """Each process passes only its slice of the batch; returns global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
    return out


def spec_tree(shardings: Any) -> Dict[str, P]:
    """{"path/to/param": PartitionSpec} for logging and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {path_str(p): s.spec for p, s in flat}


def shard_bytes(x: Any, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of an array / ShapeDtypeStruct placed with `sharding`."""
    shape = sharding.shard_shape(tuple(x.shape))
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
