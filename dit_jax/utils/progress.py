"""A host-side progress bar fed from inside compiled sampling loops through `jax.debug.callback`.

The compiled loop only calls `tick` when the loop was built with progress=True, so a loop without a bar
has no host round-trip per step. `tick` keeps one bar per loop length: it opens a bar on the first step
and closes it on the last, so the same compiled function can run many times.
"""
from __future__ import annotations

import sys
import threading

from tqdm.auto import tqdm

_lock = threading.Lock()
_bars: dict = {}


def tick(step, total: int, desc: str = "sampling") -> None:
    """Called once per loop step with the number of steps done so far (1..total)."""
    done = int(step)
    with _lock:
        bar = _bars.get((desc, total))
        if bar is None:
            bar = _bars[(desc, total)] = tqdm(total=total, desc=desc, file=sys.stderr, leave=True)
        bar.update(1)
        if done >= total or bar.n >= total:
            bar.close()
            del _bars[(desc, total)]
