"""Random-access data sources shared by the digits, folder, tfds (array_record) and latents readers.

Order: the global example stream is the concatenation of epochs, epoch e being a permutation of the data
set seeded by (seed, e). The global batch of step s is stream positions [s * B, (s + 1) * B); process p of P
takes positions [p * B / P, (p + 1) * B / P) of it. So batches depend only on (seed, step), the processes
read disjoint examples that together cover each epoch once, and a resumed run sees the same batches.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from typing import Callable

import numpy as np

from dit_jax.data.preprocess import flip_mask
from dit_jax.utils.errors import DataError

log = logging.getLogger(__name__)


class GlobalOrder:
    """Maps (step, position in the global batch) to a data set index; see the module docstring."""

    def __init__(self, num_examples: int, global_batch_size: int, process_index: int, process_count: int,
                 seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise DataError("the data set has no examples")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
        self.n, self.global_batch = num_examples, global_batch_size
        self.local_batch = global_batch_size // process_count
        self.process_index, self.seed, self.shuffle = process_index, int(seed), shuffle
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:  # consecutive steps touch at most two epochs
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = (np.random.default_rng([self.seed, epoch, 0x0DE7]).permutation(self.n)
                                      if self.shuffle else np.arange(self.n))
            return self._perms[epoch]

    def local_positions(self, step: int) -> slice:
        start = self.process_index * self.local_batch
        return slice(start, start + self.local_batch)

    def local_indices(self, step: int) -> np.ndarray:
        """int64 (local_batch,): data set indices of this process's slice of step `step`."""
        pos = self.local_positions(step)
        stream = step * self.global_batch + np.arange(pos.start, pos.stop, dtype=np.int64)
        epochs, offsets = np.divmod(stream, self.n)
        out = np.empty_like(stream)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out


class SkipCorrupt:
    """Reads example i, or, if it is corrupt, the next valid one (i+1, i+2, ... mod n), deterministically.

    Corrupt examples are remembered (so each warns once) and counted in `num_skipped`.
    """

    def __init__(self, read: Callable[[int], dict], num_examples: int, describe: Callable[[int], str],
                 max_tries: int = 1000):
        self.read, self.n, self.describe = read, num_examples, describe
        self.max_tries = min(max_tries, num_examples)
        self.bad: dict[int, str] = {}  # index -> why it could not be read
        self._lock = threading.Lock()

    @property
    def num_skipped(self) -> int:
        return len(self.bad)

    def __call__(self, index: int) -> dict:
        tried = []
        for k in range(self.max_tries):
            j = (int(index) + k) % self.n
            tried.append(j)
            if j in self.bad:
                continue
            try:
                return self.read(j)
            except Exception as e:  # noqa: BLE001 - any decode failure means "skip this example"
                why = f"{type(e).__name__}: {e}"
                with self._lock:
                    new = j not in self.bad
                    self.bad[j] = why
                if new:
                    log.warning("skipping unreadable example %s (%s); %d skipped so far",
                                self.describe(j), why, self.num_skipped)
        first = "; ".join(f"{self.describe(j)}: {self.bad.get(j, '?')}" for j in tried[:3])
        raise DataError(f"no readable example among {len(tried)} tried from index {index}; first: {first}. "
                        f"Check that the files are images PIL can open.")


class StepSource:
    """source.batch(step) over a GlobalOrder, with `prefetch` whole batches assembled ahead in background
    threads, concurrently (the Python step loop only picks up finished batches). Subclasses define
    `_assemble(step) -> dict`."""

    def __init__(self, num_examples: int, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 seed: int = 0, random_flip: bool = True, prefetch: int = 2, shuffle: bool = True):
        self.num_examples, self.seed, self.random_flip = int(num_examples), int(seed), random_flip
        self.order = GlobalOrder(num_examples, global_batch_size, process_index, process_count, seed, shuffle)
        self._prefetch = int(prefetch)
        self._ahead = (cf.ThreadPoolExecutor(self._prefetch, thread_name_prefix="dit-prefetch")
                       if self._prefetch > 0 else None)
        self._pending: dict[int, cf.Future] = {}

    def flips(self, step: int) -> np.ndarray:
        """bool (local_batch,): which examples of this process's slice of `step` are mirrored."""
        if not self.random_flip:
            return np.zeros(self.order.local_batch, bool)
        return flip_mask(self.seed, step, self.order.global_batch)[self.order.local_positions(step)]

    def _assemble(self, step: int) -> dict:
        raise NotImplementedError

    def batch(self, step: int) -> dict:
        """This process's slice of the global batch of `step` (NumPy arrays)."""
        step = int(step)
        fut = self._pending.pop(step, None)
        if fut is None:  # not prefetched (first call or a jump): drop stale work, re-seek
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
        out = fut.result() if fut is not None else self._assemble(step)
        for s in [s for s in self._pending if s < step]:
            self._pending.pop(s).cancel()
        if self._ahead is not None:
            for s in range(step + 1, step + 1 + self._prefetch):
                if s not in self._pending:
                    self._pending[s] = self._ahead.submit(self._assemble, s)
        return out

    def close(self):
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._ahead is not None:
            self._ahead.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IndexedSource(StepSource):
    """source.batch(step) for a per-example random-access reader, decoding in `num_workers` threads.

    kind "image": reader returns {"pixels": uint8 (S, S, 3), "y"} -> {"image" (or "x"): uint8 (n, S, S, 3), "y"}
                  (the train step scales to [-1, 1] on the device: a quarter of float32's bytes to send)
    kind "pixels": reader returns {"x": float32 (S, S, C) in [-1, 1], "y"} -> {"x", "y"} (in-memory digits)
    """
    KINDS = ("image", "pixels")

    def __init__(self, read: Callable[[int], dict], num_examples: int, describe: Callable[[int], str], *,
                 kind: str, global_batch_size: int, process_index: int = 0, process_count: int = 1, seed: int = 0,
                 random_flip: bool = True, image_key: str = "image", num_workers: int = 8, prefetch: int = 2,
                 shuffle: bool = True):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        super().__init__(num_examples, global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, seed=seed, random_flip=random_flip, prefetch=prefetch,
                         shuffle=shuffle)
        self.kind, self.image_key = kind, image_key
        self.reader = SkipCorrupt(read, num_examples, describe)
        self._pool = cf.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="dit-decode")

    @property
    def num_skipped(self) -> int:
        """How many corrupt examples were found (and replaced by the next valid one) so far."""
        return self.reader.num_skipped

    def _assemble(self, step: int) -> dict:
        idx = self.order.local_indices(step)
        examples = list(self._pool.map(self.reader, idx))
        y = np.asarray([ex["y"] for ex in examples], np.int32)  # (n,)
        flips = self.flips(step)
        if self.kind == "image":
            pixels = np.stack([ex["pixels"] for ex in examples])  # (n, S, S, 3) uint8
            return {self.image_key: np.where(flips[:, None, None, None], pixels[:, :, ::-1], pixels), "y": y}
        x = np.stack([ex["x"] for ex in examples])  # (n, S, S, C) float32
        return {"x": np.where(flips[:, None, None, None], x[:, :, ::-1], x), "y": y}

    def close(self):
        super().close()
        self._pool.shutdown(wait=True, cancel_futures=True)


class LatentSource(StepSource):
    """source.batch(step) for pre-extracted latents: one ranged read of the step's rows per batch.

    reader.read_rows(indices, flips) -> {"latent_mean", "latent_std": float32 (n, h, w, 4), "y"}; the mirror
    image's latent is a stored row of its own, so a flip is the choice of row, not an array operation.
    """

    def __init__(self, reader, **kw):
        super().__init__(len(reader), **kw)
        self.reader, self.num_skipped = reader, 0

    def _assemble(self, step: int) -> dict:
        return self.reader.read_rows(self.order.local_indices(step), self.flips(step))

    def close(self):
        super().close()
        self.reader.close()
