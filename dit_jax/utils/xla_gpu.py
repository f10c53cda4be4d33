"""XLA:GPU options for the programs dit_jax compiles itself (training step, samplers, evaluation).

`OPTIONS` is what every dit_jax GPU program is compiled with (through `xla_cpu.compiler_options(platform)`,
the one hook all of them use). It is empty, i.e. XLA's defaults, until a GPU run shows a winner:
benchmarks/gpu.sh times the DiT-XL/2 training step with each of `CANDIDATES` (per program, one process,
the same card) and prints the options that beat the defaults by more than NOISE; write those into OPTIONS
(and the numbers into docs/performance.md). No GPU was at hand when this was written; no published
measurement found for single-GPU training of a model like DiT (latency hiding, the one flag NVIDIA's JAX
images set, overlaps collectives: multi-GPU).

`DIT_JAX_XLA_GPU_OPTIONS="name=value,name=value"` replaces OPTIONS for one run (e.g. to try a candidate in
real training); an option already in XLA_FLAGS is left to XLA_FLAGS.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

OPTIONS: Dict[str, Any] = {}

# What benchmarks/gpu.sh tries, one set at a time, against the defaults (names checked against jaxlib 0.10's
# XLA: an unknown compile option is an error there).
CANDIDATES: Dict[str, Dict[str, Any]] = {
    "latency_hiding_scheduler": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "cudnn_layer_norm": {"xla_gpu_enable_cudnn_layer_norm": True},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},  # cuBLAS for every GEMM
    "no_command_buffer": {"xla_gpu_enable_command_buffer": ""},  # no CUDA graphs
}
NOISE = 0.02  # a candidate must beat the defaults' images/s by more than this fraction to be adopted
ENV = "DIT_JAX_XLA_GPU_OPTIONS"


def parse_options(text: str) -> Dict[str, Any]:
    """"a=true,b=0,c=" -> {"a": True, "b": 0, "c": ""}; a ValueError names a malformed entry."""
    out: Dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"{ENV}: {item!r} is not name=value with an xla_ option name")
        low = value.lower()
        out[name] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return out


def compiler_options() -> Optional[Dict[str, Any]]:
    """The options for a dit_jax program on a GPU, or None for XLA's defaults."""
    opts = parse_options(os.environ[ENV]) if ENV in os.environ else dict(OPTIONS)
    flags = os.environ.get("XLA_FLAGS", "")
    opts = {k: v for k, v in opts.items() if k not in flags}
    return opts or None
