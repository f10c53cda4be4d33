"""Stopping a run together: SIGTERM (a preempted VM) or Ctrl-C on any process stops every process at the
same point, where the loop saves a checkpoint.

    watcher = preemption.Watcher()       # before the loop
    ...after every step, and between the batches of an evaluation or a sample grid:
    reason = watcher.check()             # None, PREEMPTED or INTERRUPTED
    watcher.close()

`check` is a collective decision: every process calls it at the same points in the same order, and the
n-th call returns the same answer on every process. `raise_if_stopping` raises `Stop` instead (evaluation
and sample grids call it between their batches, so a stop does not wait for them to finish).

Several processes (jax.distributed): JAX's preemption sync manager catches SIGTERM on whichever process
gets it and tells the others through the coordination service; `reached_preemption_sync_point(n)` then
returns True on every process at the same call n (the largest call count any process had reached, plus
one). Ctrl-C takes the same path: the first SIGINT sets this process's `interrupted` flag and sends this
process a SIGTERM. At the agreed call one all-gather of the processes' `interrupted` flags tells every
process whether anyone pressed Ctrl-C (INTERRUPTED: all exit 130) or not (PREEMPTED). Between stops a
check costs the sync manager's local test, no collective (benchmarks/stop_check_cost.py). Where the
preemption service is off (jax_enable_preemption_service=False) Python handlers set both flags and every
check all-gathers them instead (one small collective per check).

One process: Python handlers set the flags and the next check reports them. A second Ctrl-C stops at once
(the default handler is back). A KeyboardInterrupt raised anywhere inside a step could land in orbax's
asynchronous save and leave its cleanup waiting forever, so the first one is only taken at a check.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("dit_jax.preemption")

PREEMPTED = "preempted"  # SIGTERM on some process
INTERRUPTED = "interrupted"  # Ctrl-C on some process


class Stop(Exception):
    """Raised by `Watcher.raise_if_stopping` on every process at the same point; `reason` as `check`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Watcher:
    """check() -> None, or the reason every process stops for, the same on all at the same call."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.calls = 0
        self.interrupted = False
        self._term = threading.Event()
        self._previous_term = None
        self._previous_int = None
        self.watching_sigterm = True
        self.sync_manager = False  # several processes and JAX's preemption service: SIGTERM goes through it
        if self.multi:
            try:
                multihost_utils.reached_preemption_sync_point(0)  # call 0: only tells whether the service runs
                self.sync_manager = True
            except RuntimeError as e:  # the same on every process: the service is on everywhere or nowhere
                log.info("preemption: %s; stop requests are all-gathered at every check instead", e)
        try:
            self._previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C stays Python's own
            pass
        if self.sync_manager:
            return  # JAX's handler takes SIGTERM (a Python handler would replace it)
        try:
            self._previous_term = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self.watching_sigterm = False

    def _on_sigterm(self, signum, frame) -> None:
        self._term.set()

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._previous_int)  # a second Ctrl-C stops at once
        self._previous_int = None
        os.write(2, b"interrupted: stopping after this step (Ctrl-C again to stop now)\n")
        if self.sync_manager:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier: every process stops at one call

    def check(self) -> Optional[str]:
        """None to go on; PREEMPTED or INTERRUPTED to stop (every process gets the same at this call)."""
        self.calls += 1
        if self.sync_manager:
            if not multihost_utils.reached_preemption_sync_point(self.calls):
                return None
            anyone = _gather_flags([self.interrupted])[:, 0].any()
            return INTERRUPTED if anyone else PREEMPTED
        flags = [self.interrupted, self._term.is_set()]
        if self.multi:
            flags = _gather_flags(flags).any(axis=0)
        if flags[0]:
            return INTERRUPTED
        return PREEMPTED if flags[1] else None

    def raise_if_stopping(self) -> None:
        reason = self.check()
        if reason is not None:
            raise Stop(reason)

    def close(self) -> None:
        for sig, attr in ((signal.SIGTERM, "_previous_term"), (signal.SIGINT, "_previous_int")):
            if getattr(self, attr) is not None:
                try:
                    signal.signal(sig, getattr(self, attr))
                except ValueError:
                    pass
                setattr(self, attr, None)


def _gather_flags(flags) -> np.ndarray:
    """(processes, len(flags)) bool: every process's flags (a collective)."""
    return np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32))).reshape(-1, len(flags)) > 0
