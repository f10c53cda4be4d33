"""Pre-extracted VAE latents (written by dit-jax-extract-latents, read back by the "latents" source), on local
disk or in a bucket (any path or URL: gs://...).

Layout of DIR (format dit_jax.latents.v2):
  index.json                 settings of the extraction, number of examples, shard size (see `write_index`)
  shard-00000/latents.npy    (k, 2, 2, h, w, 4): [example, (image, mirrored image), (mean, std), h, w, c]
  shard-00000/y.npy          int32 (k,)
  done/shard-00000           empty marker, written after the two files: the shard is complete
Shard s holds examples [s * shard_size, min((s + 1) * shard_size, N)) in data set order; each shard is
written by one process, so the hosts of a multi-host extraction write disjoint files.

Reading is random access by byte ranges: the record of (example i, flip f) is the contiguous
`2 * h * w * 4 * itemsize` bytes at `header + ((i % shard_size) * 2 + f) * record` of latents.npy of shard
i // shard_size. A batch is one call of ranged reads (dit_jax/data/byte_ranges.py): one request per
example, the rows of the step and nothing else, so a run resumed at any step costs what that step costs.
The .npy files are plain NumPy files (np.load opens a local one).

The older layout dit_jax.latents.v1 (shard-00000/{mean,std,y}.npy, each (k, 2, h, w, 4); a shard directory
is complete when present) is still read, with two requests per example.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Dict, Sequence

import numpy as np

from dit_jax.data.byte_ranges import open_files
from dit_jax.utils import paths
from dit_jax.utils.errors import DataError

INDEX = "index.json"
FORMAT = "dit_jax.latents.v2"
FORMAT_V1 = "dit_jax.latents.v1"
DONE = "done"


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def npy_header(shape: Sequence[int], dtype) -> bytes:
    """The .npy (version 1.0) header of a C-ordered array: what np.save writes before the raw data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"shape": tuple(int(d) for d in shape), "fortran_order": False,
                                               "descr": np.lib.format.dtype_to_descr(np.dtype(dtype))})
    return buf.getvalue()


def _write_file(path, data: bytes) -> None:
    """Write a whole file: a bucket object appears complete or not at all; a local file is renamed into place."""
    path = paths.as_path(path)
    if paths.is_url(path):
        path.write_bytes(data)
        return
    tmp = f"{os.fspath(path)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _npy_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    return npy_header(arr.shape, arr.dtype) + arr.tobytes()


def done_shards(out_dir) -> set:
    """Shards of a v2 directory whose completion marker exists (one listing)."""
    d = paths.as_path(out_dir) / DONE
    if not d.exists():
        return set()
    return {int(p.name[6:]) for p in d.iterdir() if p.name.startswith("shard-") and p.name[6:].isdigit()}


def clear_shard(out_dir, s: int) -> None:
    """Remove what a killed writer left of an unfinished shard s (nothing if absent)."""
    d = paths.as_path(out_dir) / shard_name(s)
    if d.exists():
        d.rmtree(missing_ok=True)


def write_shard(out_dir, s: int, latents: np.ndarray, y: np.ndarray) -> None:
    """Write shard s: latents (k, 2, 2, h, w, 4), labels (k,); the marker last, so a marked shard is complete."""
    root = paths.as_path(out_dir)
    if latents.ndim != 6 or latents.shape[1:3] != (2, 2) or len(y) != len(latents):
        raise ValueError(f"shard {s}: latents {latents.shape} / labels {np.shape(y)} are not (k, 2, 2, h, w, 4) / (k,)")
    (root / shard_name(s)).mkdir(parents=True, exist_ok=True)
    _write_file(root / shard_name(s) / "latents.npy", _npy_bytes(latents))
    _write_file(root / shard_name(s) / "y.npy", _npy_bytes(np.asarray(y, np.int32)))
    (root / DONE).mkdir(parents=True, exist_ok=True)
    _write_file(root / DONE / shard_name(s), b"")


def write_index(out_dir, settings: dict) -> dict:
    """Create index.json, or check that an existing one (a resumed run) has the same settings.

    Every process of a multi-host extraction calls this; they write the same bytes."""
    path = paths.as_path(out_dir) / INDEX
    settings = {"format": FORMAT, **settings}
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"{paths.display(out_dir)} holds an extraction with other settings ({what}); use "
                            f"another --out or delete it")
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_file(path, json.dumps(settings, indent=1).encode())
    return settings


def _missing_shards(root, index: dict) -> list:
    n = int(index["num_shards"])
    if index.get("format") == FORMAT_V1:  # v1: a shard directory is renamed into place when complete
        present = {p.name for p in root.iterdir()} if root.exists() else set()
        return [s for s in range(n) if shard_name(s) not in present]
    done = done_shards(root)
    return [s for s in range(n) if s not in done]


def read_index(latents_dir) -> dict:
    """index.json of a complete latents directory; errors name what is missing and how to finish it."""
    if not latents_dir:
        raise DataError("data.latents_dir is empty: set it to the --out directory of dit-jax-extract-latents")
    root = paths.as_path(latents_dir)
    where = paths.display(latents_dir)
    path = root / INDEX
    if not path.exists():
        raise DataError(f"{where} has no {INDEX}: it is not a latents directory; create one with "
                        f"dit-jax-extract-latents --out {where} (see docs/data.md)")
    index = json.loads(path.read_text())
    if index.get("format") not in (FORMAT, FORMAT_V1):
        raise DataError(f"{where}/{INDEX} has format {index.get('format')!r}, expected {FORMAT!r} "
                        f"(or the older {FORMAT_V1!r})")
    missing = _missing_shards(root, index)
    if missing:
        raise DataError(f"latents in {where} are incomplete: {len(missing)} of {index['num_shards']} "
                        f"shards missing (first: {shard_name(missing[0])}); rerun the same "
                        f"dit-jax-extract-latents command to finish (finished shards are kept)")
    return index


class LatentsReader:
    """Random access to extracted latents by byte ranges, locally or from a bucket.

    read_rows(indices, flips) -> {"latent_mean", "latent_std": float32 (n, h, w, 4), "y": int32 (n,)}: the
    posterior of example indices[k], mirrored where flips[k]. `stats` counts the requests and bytes fetched.
    Opening reads index.json, the labels (one request per shard, all at once) and one header.
    """

    def __init__(self, latents_dir):
        self.dir = paths.display(latents_dir)
        self.index = read_index(latents_dir)
        self.v1 = self.index["format"] == FORMAT_V1
        self.n = int(self.index["num_examples"])
        self.shard_size, self.num_shards = int(self.index["shard_size"]), int(self.index["num_shards"])
        self.dtype = np.dtype(self.index.get("dtype", "float32"))
        self.latent_shape = tuple(int(d) for d in self.index["latent_shape"])  # (h, w, 4)
        self.files = open_files(latents_dir)
        self.stats = self.files.stats
        # v2: one record = (mean, std) of one flip; v1: one record = mean (or std) of one flip, two files
        self.record_shape = self.latent_shape if self.v1 else (2, *self.latent_shape)
        self.record_bytes = int(np.prod(self.record_shape)) * self.dtype.itemsize
        self._check_header()
        self.labels = self._read_labels()  # (N,) int32

    def __len__(self) -> int:
        return self.n

    def _rows(self, s: int) -> int:
        return min(self.shard_size, self.n - s * self.shard_size)

    def _data_files(self):
        return ("mean.npy", "std.npy") if self.v1 else ("latents.npy",)

    def _header_len(self, s: int) -> int:
        return len(npy_header((self._rows(s), 2, *self.record_shape), self.dtype))

    def _check_header(self) -> None:
        """The first shard's header must be the one the offsets assume (shape and dtype of index.json)."""
        want = npy_header((self._rows(0), 2, *self.record_shape), self.dtype)
        rel = f"{shard_name(0)}/{self._data_files()[0]}"
        try:
            got = self.files.read_ranges([rel], [0], [len(want)])[0]
        except (OSError, ValueError) as e:
            raise DataError(f"{self.dir}/{rel}: cannot be read ({type(e).__name__}: {e})") from e
        if got != want:
            raise DataError(f"{self.dir}/{rel} does not hold {self.dtype} {(self._rows(0), 2, *self.record_shape)} "
                            f"as {INDEX} says (header {got[:80]!r}); the directory is damaged or of another tool")

    def _read_labels(self) -> np.ndarray:
        shards = range(self.num_shards)
        rels = [f"{shard_name(s)}/y.npy" for s in shards]
        heads = [len(npy_header((self._rows(s),), np.int32)) for s in shards]
        raw = self.files.read_ranges(rels, heads, [h + 4 * self._rows(s) for s, h in zip(shards, heads)])
        return np.concatenate([np.frombuffer(r, np.int32) for r in raw]) if raw else np.zeros(0, np.int32)

    def read_rows(self, indices: np.ndarray, flips: np.ndarray) -> Dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        flips = np.asarray(flips, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"example indices {indices.min()}..{indices.max()} outside [0, {self.n})")
        shards, rows = np.divmod(indices, self.shard_size)
        rels, starts = [], []
        for name in self._data_files():
            for s, k, f in zip(shards.tolist(), rows.tolist(), flips.tolist()):
                rels.append(f"{shard_name(s)}/{name}")
                starts.append(self._header_len(s) + (2 * k + f) * self.record_bytes)
        ends = [a + self.record_bytes for a in starts]
        try:
            raw = self.files.read_ranges(rels, starts, ends)
        except OSError as e:
            raise DataError(f"reading latents from {self.dir}: {e}") from e
        data = np.frombuffer(b"".join(raw), self.dtype)
        n = len(indices)
        if self.v1:  # (2 files, n, h, w, 4)
            both = data.reshape(2, n, *self.latent_shape)
            mean, std = both[0], both[1]
        else:  # (n, 2 [mean, std], h, w, 4)
            both = data.reshape(n, 2, *self.latent_shape)
            mean, std = both[:, 0], both[:, 1]
        return {"latent_mean": mean.astype(np.float32), "latent_std": std.astype(np.float32),
                "y": self.labels[indices]}

    def read(self, i: int) -> dict:
        """Example i as {"mean", "std": (2, h, w, 4) [image, mirrored], "y"} (tools and tests; two requests)."""
        rows = self.read_rows(np.array([i, i]), np.array([0, 1]))
        return {"mean": rows["latent_mean"], "std": rows["latent_std"], "y": int(rows["y"][0])}

    def describe(self, i: int) -> str:
        return f"{self.dir}/{shard_name(int(i) // self.shard_size)} example {i}"

    def close(self) -> None:
        self.files.close()
