"""Inception features of many images, each call split across every device of every host.

    ext = FeatureExtractor(params, per_device_batch=32)        # dtype=jnp.bfloat16 for bf16 compute
    feats = ext.extract(images)    # images: uint8 (N, H, W, 3) array or an ImageSource (npz, folder)
    feats["pool"]              # (N, 2048) float32: FID, precision/recall
    feats["spatial"]           # (N, 2023) float32: sFID
    feats["logits_unbiased"]   # (N, 1008) float32: Inception Score

Images are cut into chunks of per_device_batch x (all devices); within a chunk, each host reads only the
images of its own devices (jax.make_array_from_process_local_data), and the features come back replicated,
so every host ends with all N rows in order. The last chunk is padded to the fixed shape (one compilation
per image size) and the padding dropped. Sources only need `len(source)` and `source.read(start, stop)`.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Dict, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dit_jax.evaluation.inception import inception_forward, with_fused_heads
from dit_jax.utils import xla_cpu

OUTPUTS = ("pool", "spatial", "logits_unbiased")


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...  # uint8 (stop - start, H, W, 3)


class ArraySource:
    """An in-memory uint8 (N, H, W, 3) array as an ImageSource."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.images[start:stop])


@functools.lru_cache(maxsize=16)
def _compiled(devices: tuple, dtype_name: str, fuse: bool):
    """One jitted network per (devices, dtype, fuse): extractors built again (e.g. every evaluation during
    training) reuse its compilations."""
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def run(p, x):
        return {k: v for k, v in inception_forward(p, x, jnp.dtype(dtype_name), fuse).items() if k in OUTPUTS}

    return jax.jit(run, in_shardings=(replicated, batched), out_shardings=replicated,
                   compiler_options=xla_cpu.compiler_options(devices[0].platform))


class FeatureExtractor:
    def __init__(self, params: Dict[str, Any], per_device_batch: int = 32, dtype: Any = jnp.float32,
                 fuse: bool = True, devices: Optional[list] = None):
        if per_device_batch < 1:
            raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.local = [d for d in devices if d.process_index == jax.process_index()]
        self.per_device = per_device_batch
        self.local_batch = per_device_batch * len(self.local)
        self.global_batch = per_device_batch * len(devices)
        self.batched = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        rows = sorted((sl[0].start or 0) for sl in self.batched.addressable_devices_indices_map(
            (self.global_batch,)).values())  # this host's rows of a chunk: one contiguous run
        if rows != list(range(rows[0], rows[0] + self.local_batch, per_device_batch)):
            raise ValueError("this host's devices are not contiguous in the device list; pass `devices` ordered "
                             "by process")
        self.host_offset = rows[0]
        self.params = jax.device_put(with_fused_heads(params) if fuse else params, replicated)
        self._fn = _compiled(tuple(devices), jnp.dtype(dtype).name, bool(fuse))

    def _run_chunk(self, local: np.ndarray, global_rows: Optional[int] = None) -> Dict[str, np.ndarray]:
        """One chunk: this host's (local rows, H, W, 3) -> every host's outputs, (global_rows, D) each."""
        rows = global_rows or self.global_batch
        x = jax.make_array_from_process_local_data(self.batched, local, (rows,) + local.shape[1:])
        return {k: np.asarray(v) for k, v in self._fn(self.params, x).items()}

    def _short_chunk_rows(self, rest: int) -> Optional[int]:
        """Rows for a last chunk of `rest` < global_batch images with one process: the next multiple of the
        device count, so 4 images do not run the network on a whole chunk of padding (another compile, once
        per size). None with several processes: every host's slice keeps the full-chunk layout."""
        if jax.process_count() > 1 or rest >= self.global_batch:
            return None
        return -(-rest // len(self.local)) * len(self.local)

    def extract(self, source: Any, progress: bool = True, desc: str = "Inception features") -> Dict[str, np.ndarray]:
        """Features of every image of `source` (an ImageSource or a uint8 array), in order, on every host."""
        if isinstance(source, np.ndarray):
            source = ArraySource(source)
        n = len(source)
        host = jax.process_index()
        out: Dict[str, list] = {k: [] for k in OUTPUTS}
        bar = None
        if progress and host == 0:
            bar = tqdm(total=n, desc=desc, unit="img", file=sys.stderr)
        try:
            for c0 in range(0, n, self.global_batch):
                short = self._short_chunk_rows(n - c0)
                start = min(c0 + self.host_offset, n)  # this host's slice of the chunk
                stop = min(start + self.local_batch, n)
                images = source.read(start, stop) if stop > start else None
                if images is None:  # a host past the end still takes part in the collective call
                    images = np.zeros((0,) + self._image_shape(source), np.uint8)
                rows = short or self.local_batch
                if len(images) < rows:
                    pad = np.zeros((rows - len(images),) + images.shape[1:], images.dtype)
                    images = np.concatenate([images, pad])
                feats = self._run_chunk(images, short)
                keep = min(self.global_batch, n - c0)
                for k in OUTPUTS:
                    out[k].append(feats[k][:keep])
                if bar is not None:
                    bar.update(keep)
        finally:
            if bar is not None:
                bar.close()
        return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in out.items()}

    @staticmethod
    def _image_shape(source) -> tuple:
        return tuple(source.read(0, 1).shape[1:])

    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Features of one in-memory batch (single process), without a progress bar."""
        return self.extract(ArraySource(images), progress=False)
