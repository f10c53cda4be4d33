"""glibc malloc settings that make XLA's CPU executables reuse memory between calls instead of mapping it fresh.

Why: XLA's CPU runtime allocates each call's temporaries anew (~2 GB for a DiT-S/2 batch-8 training step).
glibc serves blocks above 32 MB with a fresh `mmap` and returns them on free, so every step touches new
pages (~500,000 page faults, ~1 s of kernel time per step here). With mmap disabled, no trimming and one
arena (the runtime's worker threads would otherwise each get their own arena, whose heaps cannot hold
blocks that large), freed temporaries stay in the heap and the next step reuses them: the DiT-S/2 training
step on the 2-core CPU went from 3.4 s to 2.7 s (docs/performance.md). The price: the process keeps its
peak heap instead of returning it to the system.

The single arena costs lock contention when steps are small: the digits model (a few MB of temporaries)
trains ~25% slower with it. So `dit-jax-train` applies the settings only when the estimated temporaries of
one training step exceed `MIN_STEP_BYTES` (`training_step_bytes`); the benchmarks always apply them, to
JAX and PyTorch alike (both run in one process). Sampling does not need them: a whole sampling loop is one
call, so its temporaries are allocated once.

`configure()` must run before JAX creates its CPU client (threads that already own an arena keep it), so
the command-line entry points call it first. It does nothing when an accelerator plugin is installed
(the host-side settings would not help there; libtpu counts only on a machine with TPU chips), off Linux/glibc, or with DIT_JAX_MALLOC_TUNING=0;
DIT_JAX_MALLOC_TUNING=1 forces it on.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

from dit_jax.utils.platforms import accelerator_plugin_installed

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

MIN_STEP_BYTES = 256 * 2**20

_state = {"applied": None}


def training_step_bytes(depth: int, hidden: int, heads: int, tokens: int, batch: int) -> int:
    """Rough float32 bytes a DiT training step keeps for its backward pass.

    Per block: ~14 activations of (B, T, D) (qkv, attention output, MLP hidden, norms) and the attention
    probabilities (B, heads, T, T); B is the global batch (an upper bound for one process's share).
    """
    return 4 * depth * (14 * batch * tokens * hidden + batch * heads * tokens**2)


def configure(step_bytes: Optional[int] = None, verbose: bool = False) -> bool:
    """Apply the settings once; returns whether they are in effect.

    step_bytes: estimated temporaries of the call that repeats (see `training_step_bytes`); below
    `MIN_STEP_BYTES` nothing is changed. None: apply (when the other conditions hold)."""
    if _state["applied"] is not None:
        return _state["applied"]
    choice = os.environ.get("DIT_JAX_MALLOC_TUNING", "auto").strip().lower()
    applied = False
    if choice in ("1", "on", "true"):
        applied = _mallopt_all()
    elif choice not in ("0", "off", "false") and sys.platform.startswith("linux"):
        small = step_bytes is not None and step_bytes < MIN_STEP_BYTES
        if not small and not accelerator_plugin_installed():
            applied = _mallopt_all()
    _state["applied"] = applied
    if verbose and applied:
        print("glibc malloc: mmap off, no trim, one arena (XLA CPU temporaries reused; "
              "DIT_JAX_MALLOC_TUNING=0 disables)", file=sys.stderr)
    return applied


def _mallopt_all() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # raises AttributeError on musl and other libcs
    except (OSError, AttributeError):
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= libc.mallopt(M_ARENA_MAX, 1) == 1
    return bool(ok)
