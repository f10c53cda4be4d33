"""XLA:CPU options for the programs dit_jax compiles itself: YNNPACK library fusions off (and the hook through
which dit_jax's GPU programs get dit_jax.utils.xla_gpu's options).

Since about jaxlib 0.9, XLA:CPU hands dots and convolutions to YNNPACK by default. Measured on this project's
CPU (2-core AMD EPYC with AVX-512; jax 0.10.2), against XLA's own Eigen kernels that the option below
restores:
- convolutions: YNNPACK runs several single-threaded and 1.3-3.8x slower (Inception's Conv2d_2a 447 vs
  117 ms at batch 16); the FID Inception forward takes 4.4 s instead of 2.95 s per 16 images.
- dots: YNNPACK sums each output of a float32 dot in one long accumulation; DiT's output landed 1.4-2.4x
  further from a float64 evaluation than the release's float32 (MKL) output at small t, Eigen's blocked
  sums within 1.43x (issue 13). Most of that was the final linear, which since issue 19 is always summed
  in slices: now up to 1.24x under YNNPACK, 1.27x with Eigen (256 px; benchmarks/precision.py).
- DiT forward and training step: the same speed either way (benchmarks/throughput.py).

The option is set per compiled program (`jax.jit(..., compiler_options=...)`), never process-wide, so a
user's own programs keep XLA's defaults; `compiler_options()` gives the dict to pass to their own top-level
`jax.jit`. It is left out where it cannot apply: other platforms, a jaxlib that does not know it, an
`XLA_FLAGS` that sets it already, or DIT_JAX_CPU_YNNPACK=1 (keep YNNPACK).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp

from dit_jax.utils import xla_gpu

OPTION = "xla_cpu_experimental_ynn_fusion_type"
NO_LIBRARY_FUSIONS = {OPTION: ""}  # an empty list of fusion kinds: YNNPACK gets no dot or convolution


@functools.lru_cache(maxsize=1)
def _option_known() -> bool:
    """Whether this jaxlib's CPU compiler accepts the option (an unknown one is an error, not ignored)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=NO_LIBRARY_FUSIONS).lower(
            jax.ShapeDtypeStruct((1,), jnp.float32)).compile()
        return True
    except Exception:  # jaxlib without YNNPACK: "No such compile option" (an XlaRuntimeError subclass)
        return False


def compiler_options(platform: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """`compiler_options` for a top-level jax.jit whose program runs on `platform` (default: JAX's default
    backend): {OPTION: ""} on CPU when it applies (see the module docstring), xla_gpu.compiler_options() on
    a GPU, else None."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        return xla_gpu.compiler_options()
    if os.environ.get("DIT_JAX_CPU_YNNPACK", "0") == "1" or OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    if platform != "cpu" or jax.default_backend() != "cpu":
        return None
    return dict(NO_LIBRARY_FUSIONS) if _option_known() else None


def _traced(args, kwargs) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs)))


class jit:
    """`jax.jit(fun, **kwargs)` that adds `compiler_options()` when called at the top level.

    The options are decided at the first call (not at import, before the command lines pick a platform).
    Called inside another trace (a caller's jit or scan), it is the plain jitted function: JAX accepts
    compiler options on top-level programs only, and the caller's program decides its own."""

    def __init__(self, fun: Callable, **kwargs):
        functools.update_wrapper(self, fun)
        self._fun, self._kwargs = fun, kwargs
        self._plain = jax.jit(fun, **kwargs)
        self._top = None

    def _top_level(self):
        if self._top is None:
            opts = compiler_options()
            self._top = jax.jit(self._fun, compiler_options=opts, **self._kwargs) if opts else self._plain
        return self._top

    def __call__(self, *args, **kwargs):
        return (self._plain if _traced(args, kwargs) else self._top_level())(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._top_level().lower(*args, **kwargs)


def static_jit(**kwargs):
    """Decorator form: `@static_jit(static_argnums=0)` is `jit(fun, static_argnums=0)`."""
    return lambda fun: jit(fun, **kwargs)
