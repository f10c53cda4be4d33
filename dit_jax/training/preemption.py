"""Stopping a run together: SIGTERM (a preempted VM) or Ctrl-C on any process stops every process at the
same point, where the loop saves a checkpoint.

    watcher = preemption.Watcher()       # before the loop
    reason = watcher.check(step)         # after every step: None, PREEMPTED or INTERRUPTED
    watcher.raise_if_stopping()          # between the batches of an evaluation or a sample grid: raises Stop
    watcher.close()

Both are collective decisions: every process calls them at the same points in the same order, and the
n-th call returns the same answer on every process.

Several processes (jax.distributed): JAX's preemption sync manager catches SIGTERM on whichever process
gets it and tells the others through the coordination service; each process then reports the last value
it passed to `reached_preemption_sync_point`, and the call that passes the largest reported value plus
one returns True, on every process at the same call. `check(step)` passes the step (orbax's
CheckpointManager.save passes the step it saves too, so the values must be step numbers);
`raise_if_stopping` after step s passes s + 1. A notice that arrives during an evaluation after step s is
normally agreed at s + 1, which the evaluation's next batch passes; when some process had already passed
s + 1 it is agreed at s + 2, and every process stops after step s + 2 instead. Ctrl-C takes the same path:
the first SIGINT sets this process's `interrupted` flag and sends this process a SIGTERM. At the agreed
call one all-gather of the processes' `interrupted` flags tells every process whether anyone pressed
Ctrl-C (INTERRUPTED: all exit 130) or not (PREEMPTED). Until then a check is the sync manager's local test
(0.2 us; an all-gather of a flag at every step costs 1.5 ms: benchmarks/stop_check_cost.py, 2 processes on
CPU, and waits for the step to finish). Where the preemption service is off (jax_enable_preemption_service
=False; the first check finds out, on every process alike) Python handlers set both flags and every check
all-gathers them instead.

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

log = logging.getLogger("dit_jax.training.preemption")

PREEMPTED = "preempted"  # SIGTERM on some process
INTERRUPTED = "interrupted"  # Ctrl-C on some process


class Stop(Exception):
    """Raised by `Watcher.raise_if_stopping` on every process at the same call; `reason` as `check`'s."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Watcher:
    """check(step) -> None, or the reason every process stops for, the same on all at the same call."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.step = 0  # the last step passed to `check`
        self.interrupted = False
        self._term = threading.Event()
        self._previous_term = None
        self._previous_int = None
        self.watching_sigterm = True
        self.sync_manager = self.multi  # several processes: JAX's preemption service (until a check finds it off)
        try:
            self._previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C stays Python's own
            pass
        if not self.sync_manager:  # with it, JAX's handler takes SIGTERM (a Python handler would replace it)
            self._watch_sigterm()

    def _watch_sigterm(self) -> None:
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

    def check(self, step: int) -> Optional[str]:
        """After step `step` (every process, every step): None to go on, else PREEMPTED or INTERRUPTED."""
        self.step = int(step)
        return self._decide(self.step)

    def raise_if_stopping(self) -> None:
        """Between the batches of an evaluation or a sample grid after step `self.step`: raises Stop."""
        reason = self._decide(self.step + 1)
        if reason is not None:
            raise Stop(reason)

    def _decide(self, counter: int) -> Optional[str]:
        if self.sync_manager:
            try:
                if not multihost_utils.reached_preemption_sync_point(counter):
                    return None
                anyone = _gather_flags([self.interrupted])[:, 0].any()
                return INTERRUPTED if anyone else PREEMPTED
            except RuntimeError as e:  # the service is off: the same on every process, at this same call
                log.info("preemption: %s; stop requests are all-gathered at every check instead", e)
                self.sync_manager = False
                self._watch_sigterm()
        flags = [self.interrupted, self._term.is_set()]
        if self.multi:
            flags = _gather_flags(flags).any(axis=0)
        if flags[0]:
            return INTERRUPTED
        return PREEMPTED if flags[1] else None

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
