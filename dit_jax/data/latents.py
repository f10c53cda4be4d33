"""Pre-extracted VAE latents on disk (written by dit-jax-extract-latents, read back by the "latents" source).

Layout of DIR:
  index.json                 settings of the extraction and the shard size (see `write_index`)
  shard-00000/mean.npy       float (k, 2, h, w, 4): posterior mean of [image, mirrored image]
  shard-00000/std.npy        float (k, 2, h, w, 4): posterior std  (exp(0.5 * clip(logvar, -30, 20)))
  shard-00000/y.npy          int32 (k,)
Shard s holds examples [s * shard_size, min((s + 1) * shard_size, N)) in data set order. A shard is written
into a temporary directory and renamed into place, so a present shard is always complete.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid

import numpy as np

from dit_jax.utils.errors import DataError
from dit_jax.utils.atomic import atomic_path

INDEX = "index.json"
FORMAT = "dit_jax.latents.v1"


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def shard_done(out_dir: str, s: int) -> bool:
    return os.path.isdir(os.path.join(out_dir, shard_name(s)))


def write_shard(out_dir: str, s: int, mean: np.ndarray, std: np.ndarray, y: np.ndarray) -> None:
    """Write shard s atomically (temporary directory, then rename)."""
    tmp = os.path.join(out_dir, f".{shard_name(s)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for name, arr in (("mean", mean), ("std", std), ("y", y)):
            with open(os.path.join(tmp, name + ".npy"), "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, os.path.join(out_dir, shard_name(s)))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not shard_done(out_dir, s):  # another process finishing the same shard first is fine
            raise


def write_index(out_dir: str, settings: dict) -> dict:
    """Create index.json, or check that an existing one (a resumed run) has the same settings."""
    path = os.path.join(out_dir, INDEX)
    settings = {"format": FORMAT, **settings}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"{out_dir!r} holds an extraction with other settings ({what}); use another --out "
                            f"or delete it")
        return old
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    return settings


def read_index(latents_dir: str) -> dict:
    if not latents_dir:
        raise DataError("data.latents_dir is empty: set it to the --out directory of dit-jax-extract-latents")
    path = os.path.join(latents_dir, INDEX)
    if not os.path.isfile(path):
        raise DataError(f"{latents_dir!r} has no {INDEX}: it is not a latents directory; create one with "
                        f"dit-jax-extract-latents --out {latents_dir} (see docs/data.md)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise DataError(f"{path!r} has format {index.get('format')!r}, expected {FORMAT!r}")
    missing = [s for s in range(index["num_shards"]) if not shard_done(latents_dir, s)]
    if missing:
        raise DataError(f"latents in {latents_dir!r} are incomplete: {len(missing)} of {index['num_shards']} "
                        f"shards missing (first: {shard_name(missing[0])}); rerun the same "
                        f"dit-jax-extract-latents command to finish (finished shards are kept)")
    return index


class LatentsReader:
    """Random access to extracted latents: read(i) -> {"mean","std": (2, h, w, 4), "y"} (memory-mapped)."""

    def __init__(self, latents_dir: str):
        self.dir = latents_dir
        self.index = read_index(latents_dir)
        self.shard_size = int(self.index["shard_size"])
        self._shards: dict[int, dict] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.index["num_examples"])

    def _shard(self, s: int) -> dict:
        with self._lock:
            if s not in self._shards:
                d = os.path.join(self.dir, shard_name(s))
                self._shards[s] = {k: np.load(os.path.join(d, k + ".npy"), mmap_mode="r")
                                   for k in ("mean", "std", "y")}
            return self._shards[s]

    def read(self, i: int) -> dict:
        s, k = divmod(int(i), self.shard_size)
        sh = self._shard(s)
        return {"mean": sh["mean"][k], "std": sh["std"][k], "y": int(sh["y"][k])}

    def describe(self, i: int) -> str:
        return f"{self.dir}/{shard_name(int(i) // self.shard_size)} example {i}"
