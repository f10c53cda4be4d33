"""How evenly the training state splits over the chips that share it (the fsdp x tensor chips).

dit_jax.sharding splits a parameter evenly over a mesh axis or not at all, so a prime factor of the fsdp size
that divides none of a parameter's free dimensions leaves that parameter replicated over that factor's
sub-axis. DiT-L/2 at fsdp 96 = 32 x 3: the widths 1024 and 4096 have no factor 3, so the MLP and projection
kernels are split 32 ways instead of 96 and the state per chip is 2.0x the even split; no DiT width has a
factor 5, so at fsdp 640 = 128 x 5 every parameter is kept 5 times (5x). `split_report` measures it from the
shapes and shardings alone (an `AbstractMesh` will do: no devices, no compile); training warns and the
`--compile-only` report says so above `UNEVEN_LIMIT`. The EMA and the Adam moments are placed like the
parameters, so the factor of the parameters is the factor of the state.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Optional

import jax
import numpy as np

from dit_jax import sharding as shd

UNEVEN_LIMIT = 1.1  # state per chip above this multiple of the even split: warn
_log = logging.getLogger("dit_jax.analysis.state_split")


def split_report(abstract_params: Any, mesh, sharding_cfg, top: int = 5) -> Dict[str, Any]:
    """Parameter bytes per chip against the even split (total / the fsdp x tensor chips) and the tensors
    that leave it, grouped over blocks (the stacked "blocks/mlp/fc1/kernel", or "blocks_*/..." of the older layout), the most excess bytes first.

    mesh: a `Mesh` or an `AbstractMesh` with dit_jax.sharding's axis names."""
    shardings = shd.param_shardings(abstract_params, mesh, sharding_cfg)
    group = shd.axis_size(mesh, "fsdp") * shd.axis_size(mesh, "tensor")
    total = per_chip = 0
    excess: Dict[str, Dict[str, Any]] = {}
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                            jax.tree_util.tree_leaves(shardings)):
        nb = int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        sb = shd.shard_bytes(x, s)
        total, per_chip = total + nb, per_chip + sb
        if sb * group > nb:  # split fewer ways than there are chips sharing the state
            name = re.sub(r"blocks_\d+", "blocks_*", shd.path_str(path))
            one = x.shape[shd.stacked_dims(shd.path_str(path)):]  # one block's shape decides (sharding.py)
            small = int(np.prod(one, dtype=np.int64)) < int(sharding_cfg.fsdp_min_size)  # replicated by choice
            e = excess.setdefault(name, {"name": name, "shape": list(x.shape), "split_ways": nb // sb,
                                         "below_fsdp_min_size": small, "tensors": 0, "excess_bytes_per_chip": 0})
            e["tensors"] += 1
            e["excess_bytes_per_chip"] += sb - nb / group
    even = total / group
    factor = per_chip / even if even else 1.0
    worst = sorted(excess.values(), key=lambda e: -e["excess_bytes_per_chip"])[:top]
    return {"chips_sharing_state": group, "fsdp": shd.axis_size(mesh, "fsdp"), "tensor": shd.axis_size(mesh, "tensor"),
            "fsdp_sub_axes": [int(mesh.shape[a]) for a in shd.fsdp_axes(mesh)],
            "param_bytes_total": total, "param_bytes_per_chip": per_chip, "even_split_bytes": even,
            "factor": factor, "limit": UNEVEN_LIMIT, "uneven": factor > UNEVEN_LIMIT,
            "worst": [dict(e, excess_bytes_per_chip=int(e["excess_bytes_per_chip"])) for e in worst]}


def split_for_sizes(abstract_params: Any, fsdp: int, sharding_cfg, tensor: int = 1) -> Dict[str, Any]:
    """`split_report` for an fsdp (and tensor) size, on an abstract mesh: any size, on any machine."""
    groups = shd.fsdp_groups(abstract_params, fsdp, sharding_cfg, tensor)
    return split_report(abstract_params, shd.abstract_mesh((1, fsdp, tensor), groups), sharding_cfg)


def describe(rep: Dict[str, Any]) -> str:
    """One sentence: the factor, the sizes and the tensors split fewer ways than the chips sharing them."""
    sub = rep["fsdp_sub_axes"]
    mesh = f"fsdp={rep['fsdp']}" + (f" (sub-axes {'x'.join(map(str, sub))})" if len(sub) > 1 else "")
    mesh += f" x tensor={rep['tensor']}" if rep["tensor"] > 1 else ""
    worst = "; ".join(f"{e['name']} {tuple(e['shape'])} split {e['split_ways']} of {rep['chips_sharing_state']} ways"
                      + (f" (x{e['tensors']})" if e["tensors"] > 1 else "") for e in rep["worst"][:3])
    return (f"{mesh}: the state per chip is {rep['factor']:.2f}x the even split over the "
            f"{rep['chips_sharing_state']} chips that share it ({_size(rep['param_bytes_per_chip'])} of "
            f"parameters per chip instead of {_size(rep['even_split_bytes'])}; EMA and optimizer alike)"
            + (f"; split fewer ways: {worst}" if worst else "") + ". " + _advice(rep))


def _size(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def _advice(rep: Dict[str, Any]) -> str:
    out = []
    if any(not e["below_fsdp_min_size"] for e in rep["worst"]):
        out.append("an fsdp size whose prime factors divide the model's widths splits evenly (docs/tpu.md, "
                   "'Which fsdp sizes split evenly')")
    if any(e["below_fsdp_min_size"] for e in rep["worst"]):
        out.append("parameters below config.sharding.fsdp_min_size stay whole on every chip (a smaller "
                   "fsdp_min_size shards them too)")
    text = "; ".join(out)
    return text[:1].upper() + text[1:]


def warn_if_uneven(abstract_params: Any, mesh, sharding_cfg, log: Optional[logging.Logger] = None) -> Dict[str, Any]:
    """`split_report`, logged as a warning when the factor is above UNEVEN_LIMIT."""
    rep = split_report(abstract_params, mesh, sharding_cfg)
    if rep["uneven"]:
        (log or _log).warning("uneven state split: %s", describe(rep))
    return rep
