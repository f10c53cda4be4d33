"""Metrics to the console, a JSON-lines file and TensorBoard; sample grids to PNG files.

TensorBoard event files are written with the `tensorboard` package's record writer and protos (its
EventFileWriter would import tensorflow when installed, which costs seconds and memory), so a stock
`tensorboard --logdir WORKDIR/tb` reads them. Only process 0 should create a MetricWriter.
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

from dit_jax.utils.atomic import atomic_path
from dit_jax.utils.images import png_bytes

log = logging.getLogger("dit_jax.train")


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = None
        if tensorboard:
            tb_dir = os.path.join(workdir, "tb")
            os.makedirs(tb_dir, exist_ok=True)
            name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
            self._tb_file = open(os.path.join(tb_dir, name), "wb")
            self._tb = RecordWriter(self._tb_file)
            self._tb.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                           .SerializeToString())

    def _event(self, step: int, summary) -> None:
        self._tb.write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary).SerializeToString())
        self._tb.flush()

    def scalars(self, step: int, metrics: Dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
        self._jsonl.flush()
        log.info("step %d: %s", step, "  ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
        if self._tb is not None:
            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
            self._event(step, summary_pb2.Summary(value=values))

    def image(self, step: int, tag: str, grid_uint8: np.ndarray, path: Optional[str] = None) -> None:
        data = png_bytes(grid_uint8)
        if path:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(data)
            log.info("step %d: wrote %s", step, path)
        if self._tb is not None:
            h, w = grid_uint8.shape[:2]
            c = grid_uint8.shape[2] if grid_uint8.ndim == 3 else 1
            img = summary_pb2.Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data)
            self._event(step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=img)]))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb_file.close()
