"""Metrics to the console, a JSON-lines file and TensorBoard; sample grids to PNG files.

TensorBoard event files are written with the `tensorboard` package's record writer and protos (its
EventFileWriter would import tensorflow when installed, which costs seconds and memory), so a stock
`tensorboard --logdir WORKDIR/tb` reads them. Without the package the TensorBoard part is skipped with
one warning. Only process 0 should create a MetricWriter.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import time
from typing import Dict, Optional

import numpy as np

log = logging.getLogger("dit_jax.train")


def atomic_write_bytes(path: str, data: bytes) -> None:
    from dit_jax.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def png_bytes(image_uint8: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.asarray(image_uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: np.ndarray, rows: int, upscale: int = 1, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) float in [-1, 1], N = rows * cols -> one uint8 grid with mid-grey separators (samples
    are often black on the edges, so black separators would merge the cells)."""
    from dit_jax.images import make_grid as grid_u8

    images = np.asarray(images, np.float32)
    u8 = np.clip(127.5 * images + 128.0, 0, 255).astype(np.uint8)
    if upscale > 1:
        u8 = u8.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return grid_u8(u8, nrow=int(math.ceil(len(u8) / rows)), padding=pad, pad_value=128)


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboard.compat.proto import event_pb2
                from tensorboard.summary.writer.record_writer import RecordWriter

                tb_dir = os.path.join(workdir, "tb")
                os.makedirs(tb_dir, exist_ok=True)
                name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
                self._tb_file = open(os.path.join(tb_dir, name), "wb")
                self._tb = RecordWriter(self._tb_file)
                self._tb.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                               .SerializeToString())
            except Exception as e:  # noqa: BLE001
                log.warning("TensorBoard logging disabled (tensorboard package unusable: %s)", e)
                self._tb = None

    def _event(self, step: int, summary) -> None:
        from tensorboard.compat.proto import event_pb2

        self._tb.write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary).SerializeToString())
        self._tb.flush()

    def scalars(self, step: int, metrics: Dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
        self._jsonl.flush()
        log.info("step %d: %s", step, "  ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
        if self._tb is not None:
            from tensorboard.compat.proto import summary_pb2

            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
            self._event(step, summary_pb2.Summary(value=values))

    def image(self, step: int, tag: str, grid_uint8: np.ndarray, path: Optional[str] = None) -> None:
        data = png_bytes(grid_uint8)
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(path, data)
            log.info("step %d: wrote %s", step, path)
        if self._tb is not None:
            from tensorboard.compat.proto import summary_pb2

            h, w = grid_uint8.shape[:2]
            c = grid_uint8.shape[2] if grid_uint8.ndim == 3 else 1
            img = summary_pb2.Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data)
            self._event(step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=img)]))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb_file.close()
