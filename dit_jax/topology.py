"""TPU pod topologies for compile-only checks: devices, chips, hosts and HBM per chip of a named slice.

    topo = topology.tpu_topology("v5e:16x16")   # 256 compile-only devices of a v5e-256, 32 hosts
    topo.devices, topo.chips, topo.hosts, topo.hbm_bytes

libtpu compiles for a topology on a machine without TPUs (run with JAX_PLATFORMS=cpu); the devices it
returns can be put in a `Mesh` and jitted functions lowered and compiled for them, but nothing can run.

Per chip, not per TensorCore: v4 and v5p chips have two TensorCores that a TPU VM runs as one JAX device
("megacore"); v5e and v6e chips have one. libtpu describes v4 slices per TensorCore by default (v4:2x2x1
gives 8 devices for 4 chips); `chip_config_name="megacore"` makes it describe them as the VM runs them,
one device per chip, so the compiled program, its memory per device and the chip count all match a real
v4 job. v5p topologies are megacore already.

Hosts: libtpu's default is 4 chips per host; v5e and v6e pods have 8 chips per host (2x4 chips), so
`chips_per_host_bounds` is set from the generation, which gives the process count of a real slice
(v5e:16x16 -> 32 hosts, v4:4x4x8 -> 32, v5p:4x4x4 -> 16).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from jax.experimental import topologies

from dit_jax.utils.errors import DitJaxError
from dit_jax.analysis.mfu import rated_peak  # the one table of rated peaks
from dit_jax.utils.platforms import libtpu_installed

GIB = 2**30

# HBM per chip and where the number comes from (the Cloud TPU system architecture pages; they write
# "GB" for v5e/v5p/v6e and "GiB" for v4; HBM stacks come in binary sizes, so all are taken as GiB).
# ici_gbytes_per_s: "bidirectional inter-chip interconnect (ICI) bandwidth per chip" in GB/s where those pages
# state it (v5e 400, v5p 1200); None where they do not.
GENERATIONS: Dict[str, Dict[str, Any]] = {
    "v4": dict(device_kind="TPU v4", hbm_gib=32, chips_per_host=(2, 2, 1),
               ici_gbytes_per_s=None, tensorcores_per_chip=2, megacore=True,
               source="https://cloud.google.com/tpu/docs/v4: HBM2 capacity 32 GiB per chip"),
    "v5e": dict(device_kind="TPU v5 lite", hbm_gib=16, chips_per_host=(2, 4, 1),
                ici_gbytes_per_s=400, tensorcores_per_chip=1, megacore=False,
                source="https://cloud.google.com/tpu/docs/v5e: HBM2 capacity 16 GB per chip"),
    "v5p": dict(device_kind="TPU v5", hbm_gib=95, chips_per_host=(2, 2, 1),
                ici_gbytes_per_s=1200, tensorcores_per_chip=2, megacore=True,
                source="https://cloud.google.com/tpu/docs/v5p: HBM2e capacity 95 GB per chip"),
    "v6e": dict(device_kind="TPU v6 lite", hbm_gib=32, chips_per_host=(2, 4, 1),
                ici_gbytes_per_s=None, tensorcores_per_chip=1, megacore=False,
                source="https://cloud.google.com/tpu/docs/v6e: HBM capacity 32 GB per chip"),
}
EXAMPLES = ("v5e:2x2", "v5e:16x16", "v4:2x2x1", "v4:4x4x8", "v5p:4x4x4", "v6e:16x16")
TPU_EXTRA = "pip install -e '.[tpu]' (or pip install 'jax[tpu]')"
_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


class TopologyError(DitJaxError, ValueError):
    pass


@dataclasses.dataclass
class Topology:
    name: str
    generation: str
    devices: List[Any]  # one compile-only JAX device per chip
    dims: Tuple[int, ...]  # chips per dimension
    hosts: int
    hbm_bytes: int  # per chip
    hbm_source: str
    tensorcores_per_chip: int
    megacore: bool
    peak_bf16_tflops: float
    ici_gbytes_per_s: Optional[float] = None  # bidirectional ICI bandwidth per chip (GB/s); None: not stated

    @property
    def chips(self) -> int:
        return len(self.devices)


def _valid() -> str:
    return ", ".join(EXAMPLES)


def tpu_topology(name: str) -> Topology:
    """The compile-only devices of a TPU slice named like "v5e:16x16" (generation:chips per dimension)."""
    m = _NAME.match(name.strip().lower())
    if not m or m.group(1) not in GENERATIONS:
        raise TopologyError(f"unknown TPU topology {name!r}; use GENERATION:CHIPS like {_valid()} "
                            f"(generations {', '.join(GENERATIONS)})")
    gen, spec = m.group(1), GENERATIONS[m.group(1)]
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if any(d < 1 for d in dims):
        raise TopologyError(f"TPU topology {name!r} has an empty dimension; valid examples: {_valid()}")
    if not libtpu_installed():
        raise TopologyError(f"compiling for TPU topology {name!r} needs libtpu, which is not installed: {TPU_EXTRA}")
    # libtpu takes /tmp/libtpu_lockfile when it loads, so that one process owns the chips; a compile-only
    # load opens no chip, and the lock would stop two checks (or a check beside a TPU job) running at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    dims3 = dims + (1,) * (3 - len(dims))
    kwargs: Dict[str, Any] = {"chips_per_host_bounds": [min(d, c) for d, c in zip(dims3, spec["chips_per_host"])]}
    if gen == "v4":
        kwargs["chip_config_name"] = "megacore"
    try:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{m.group(2)}",
                                                    **kwargs).devices)
    except Exception as e:  # noqa: BLE001  (libtpu reports bad shapes as JaxRuntimeError INVALID_ARGUMENT)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"libtpu cannot describe TPU topology {name!r} ({first}); valid examples: "
                            f"{_valid()}") from None
    chips = math.prod(dims)
    if len(devices) != chips:
        raise TopologyError(f"libtpu describes {name!r} with {len(devices)} devices for {chips} chips; expected "
                            f"one device per chip")
    return Topology(name=f"{gen}:{m.group(2)}", generation=gen, devices=devices, dims=dims,
                    hosts=len({d.process_index for d in devices}), hbm_bytes=int(spec["hbm_gib"] * GIB),
                    hbm_source=spec["source"], tensorcores_per_chip=spec["tensorcores_per_chip"],
                    megacore=spec["megacore"], peak_bf16_tflops=rated_peak(spec["device_kind"]).bf16_tflops,
                    ici_gbytes_per_s=spec["ici_gbytes_per_s"])


def device_hbm_bytes(device) -> Tuple[Optional[int], str]:
    """(HBM bytes of one device, where the number comes from); (None, why) when unknown (CPU).

    A real accelerator reports its usable memory (memory_stats()["bytes_limit"]); compile-only TPU
    devices cannot, so their generation's HBM per chip is used."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (compile-only devices raise INVALID_ARGUMENT)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind}: memory_stats()['bytes_limit']"
    if getattr(device, "platform", "") == "tpu":
        for gen, spec in GENERATIONS.items():
            if device.device_kind == spec["device_kind"]:
                return int(spec["hbm_gib"] * GIB), spec["source"]
        return None, f"unknown TPU kind {device.device_kind!r}"
    return None, f"{getattr(device, 'platform', '?')} device: no HBM limit (host memory)"


def memory_per_chip(mesh_config, device) -> Tuple[Optional[int], str]:
    """(bytes the mesh plan and --compile-only may use per chip, where the number comes from):
    config.mesh.memory_per_chip_gib when set (a chip shared with another program, or a smaller budget on
    purpose), else the device's HBM (`device_hbm_bytes`)."""
    gib = mesh_config.get("memory_per_chip_gib") if hasattr(mesh_config, "get") else None
    if gib is not None:
        if not float(gib) > 0:
            raise TopologyError(f"config.mesh.memory_per_chip_gib={gib}: expected a positive number of GiB "
                                "or None for the device's memory")
        return int(float(gib) * GIB), f"config.mesh.memory_per_chip_gib={gib}"
    return device_hbm_bytes(device)
