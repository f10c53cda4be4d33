"""Metrics to the console, a JSON-lines file and TensorBoard; sample grids to PNG files. Local folders and
bucket URLs (gs://...) alike.

TensorBoard event files are written with the `tensorboard` package's record writer and protos (its
EventFileWriter would import tensorflow when installed, which costs seconds and memory), so a stock
`tensorboard --logdir WORKDIR/tb` reads them, from a bucket too. Only process 0 should create a MetricWriter.

Objects on a bucket cannot be appended to. A local file is appended and flushed at every record (a killed
run loses nothing); on a bucket a growing file is kept in memory and uploaded whole as one object (an upload
is atomic: readers see the previous or the new version, never a torn one) at most every `flush_secs`
seconds (BUCKET_FLUSH_SECS) and at `close()`, as tf.io.gfile and tensorboard's own gfile do for GCS (they
re-upload the whole file on every flush). So a run killed with SIGKILL loses at most the last `flush_secs`
of metrics. The cost stays bounded: TensorBoard reads every event file of a folder in name order, so the
event file is rotated (a new object, named by the time it starts) once it reaches TB_ROTATE_BYTES, and a
flush rewrites at most that much; metrics.jsonl stays one object (about 200 bytes per logged step) and a
resumed run continues it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Dict, Optional

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from dit_jax.utils import paths
from dit_jax.utils.atomic import write_bytes
from dit_jax.utils.images import png_bytes

log = logging.getLogger("dit_jax.train")
BUCKET_FLUSH_SECS = 30.0
TB_ROTATE_BYTES = 4 * 2**20
METRICS_NAME = "metrics.jsonl"
TB_DIR = "tb"


class GrowingObject:
    """A bucket object that grows: its bytes in memory, uploaded whole at most every `flush_secs` seconds
    (`flush(force=True)` and `close()` always upload pending bytes)."""

    def __init__(self, path: paths.Path, flush_secs: float, keep_existing: bool = False):
        self.path, self.flush_secs = path, float(flush_secs)
        self.data = bytearray(path.read_bytes() if keep_existing and path.exists() else b"")
        self.dirty = False
        self.last_upload = float("-inf")

    def write(self, data: bytes) -> None:
        self.data += data
        self.dirty = True

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.dirty and (force or now - self.last_upload >= self.flush_secs):
            paths.write_object(self.path, bytes(self.data))
            self.dirty, self.last_upload = False, now

    def close(self) -> None:
        self.flush(force=True)

    def tell(self) -> int:
        return len(self.data)


class LocalAppend:
    """A local file appended to and flushed at every write (the same interface as GrowingObject)."""

    def __init__(self, path: paths.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(os.fspath(path), "ab")

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def flush(self, force: bool = False) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def tell(self) -> int:
        return self.f.tell()


def growing_file(path: paths.Path, flush_secs: float):
    """A file that is only ever appended to, on a local disk or a bucket (see the module docstring)."""
    if paths.is_url(path):
        return GrowingObject(path, flush_secs, keep_existing=True)
    return LocalAppend(path)


class TensorBoardEvents:
    """Event records into WORKDIR/tb/events.out.tfevents.<time>.<host>.<pid>; on a bucket a new file (a later
    name, which TensorBoard reads after the earlier ones) starts when the current one reaches rotate_bytes."""

    def __init__(self, folder: paths.Path, flush_secs: float, rotate_bytes: Optional[int]):
        self.folder, self.flush_secs, self.rotate_bytes = folder, flush_secs, rotate_bytes
        self.sink = None
        self.started = 0.0  # the time in the current file's name
        self._open()

    def _open(self) -> None:
        if self.sink is not None:
            self.sink.close()
        self.started = max(time.time(), self.started + 1e-6)  # names sort in write order, never repeat
        name = f"events.out.tfevents.{self.started:.6f}.{socket.gethostname()}.{os.getpid()}"
        path = self.folder / name
        self.sink = GrowingObject(path, self.flush_secs) if paths.is_url(path) else LocalAppend(path)
        self.records = RecordWriter(self.sink)
        self.records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def write(self, event: event_pb2.Event) -> None:
        if self.rotate_bytes is not None and self.sink.tell() >= self.rotate_bytes:
            self._open()
        self.records.write(event.SerializeToString())
        self.sink.flush()

    def close(self) -> None:
        self.sink.close()


class MetricWriter:
    """metrics.jsonl, TensorBoard events and the log line of each logged step; PNGs of sample grids.

    `flush_secs`: how often a bucket file is uploaded again (default BUCKET_FLUSH_SECS; local files are
    flushed at every record whatever the value)."""

    def __init__(self, workdir: paths.PathLike, tensorboard: bool = True, flush_secs: Optional[float] = None):
        self.workdir = paths.as_path(workdir)
        flush = BUCKET_FLUSH_SECS if flush_secs is None else flush_secs
        self._jsonl = growing_file(self.workdir / METRICS_NAME, flush)
        self._tb = None
        if tensorboard:
            rotate = TB_ROTATE_BYTES if paths.is_url(self.workdir) else None
            self._tb = TensorBoardEvents(self.workdir / TB_DIR, flush, rotate)

    def scalars(self, step: int, metrics: Dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write((json.dumps({"step": int(step), **metrics}) + "\n").encode("utf-8"))
        self._jsonl.flush()
        log.info("step %d: %s", step, "  ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
        if self._tb is not None:
            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
            self._tb.write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def image(self, step: int, tag: str, grid_uint8: np.ndarray, path: Optional[paths.PathLike] = None) -> None:
        data = png_bytes(grid_uint8)
        if path:
            write_bytes(path, data)
            log.info("step %d: wrote %s", step, paths.display(path))
        if self._tb is not None:
            h, w = grid_uint8.shape[:2]
            c = grid_uint8.shape[2] if grid_uint8.ndim == 3 else 1
            img = summary_pb2.Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data)
            self._tb.write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                                                      image=img)])))

    def flush(self) -> None:
        """Upload whatever a bucket file holds that is not uploaded yet (local files are always flushed)."""
        self._jsonl.flush(force=True)
        if self._tb is not None:
            self._tb.sink.flush(force=True)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
