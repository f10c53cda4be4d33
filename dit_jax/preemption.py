"""Preemption: on SIGTERM to any process, all processes agree on a step, save a checkpoint there and stop.

    watcher = preemption.Watcher()        # before the loop
    ...after step s:  if watcher.reached(s): save, stop (exit 0)
    watcher.close()

Spot / preemptible TPU VMs get SIGTERM shortly before they are taken away. With several processes
(jax.distributed), JAX's preemption sync manager catches SIGTERM on whichever process gets it, tells the
others through the coordination service, and `multihost_utils.reached_preemption_sync_point(step)` returns
True on every process at the same step (the largest step any process has reached, plus one), so all of
them take part in the same checkpoint. Every process must call `reached` after every step, with the same
steps. With one process a Python SIGTERM handler sets a flag that `reached` reports at the next step.
A rerun of the same command resumes from that checkpoint (train.py), like any other resume.

Ctrl-C (SIGINT) is also taken at a step boundary: the first one sets `interrupted`, the loop raises
KeyboardInterrupt after the step (its cleanup waits for a checkpoint write in progress), and the default
handler is back, so a second Ctrl-C stops at once. A KeyboardInterrupt raised anywhere inside a step could
land in orbax's asynchronous save and leave its cleanup waiting forever.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import jax
from jax.experimental import multihost_utils

log = logging.getLogger("dit_jax.preemption")


class Watcher:
    """reached(step) -> True once, on every process at the same step, after a SIGTERM anywhere."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._flag = threading.Event()
        self._previous = None
        self._previous_int = None
        self.interrupted = False
        self.enabled = True
        try:
            self._previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C stays Python's own
            pass
        if self.multi:
            return  # JAX's preemption sync manager handles SIGTERM (a Python handler would replace it)
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self.enabled = False

    def _on_sigterm(self, signum, frame) -> None:
        self._flag.set()

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._previous_int)  # a second Ctrl-C stops at once
        self._previous_int = None
        os.write(2, b"interrupted: stopping after this step (Ctrl-C again to stop now)\n")

    def reached(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.multi:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(int(step)))
            except RuntimeError as e:  # jax.distributed without its preemption service: the same on all
                self.enabled = False
                log.warning("preemption: %s; SIGTERM will stop this job without a checkpoint", e)
                return False
        return self._flag.is_set()

    def close(self) -> None:
        for sig, attr in ((signal.SIGTERM, "_previous"), (signal.SIGINT, "_previous_int")):
            if getattr(self, attr) is not None:
                try:
                    signal.signal(sig, getattr(self, attr))
                except ValueError:
                    pass
                setattr(self, attr, None)
