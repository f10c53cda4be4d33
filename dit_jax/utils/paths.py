"""The one path type of dit_jax: `etils.epath.Path`, for local paths and URLs alike (`gs://`, `s3://`, ...).

Every path a command reads or writes goes through `as_path` (never `os.path.abspath` or `open` on a user
path): `gs://bucket/run` stays a bucket path, `runs/x` stays a local one. orbax, which writes the
checkpoints, takes the same paths.

Backend: epath reads buckets through fsspec (gcsfs for gs://) unless TensorFlow is installed, when it would
switch to tf.io.gfile. dit_jax pins the fsspec backend (EPATH_USE_TF=false unless the user set it): one
backend whether or not the data extra is installed, and the one the tests run against a GCS emulator on
127.0.0.1 (tf.io.gfile ignores STORAGE_EMULATOR_HOST and always calls Google's endpoint). Set
EPATH_USE_TF=true before starting a command to use tf.io.gfile instead.

Object stores differ from a disk in three ways the rest of the project relies on knowing:
- an object appears only when its upload is complete (`upload`, `write_object`): a single file is atomic;
- folders are name prefixes and cannot be renamed atomically (dit_jax.utils.atomic marks folder writes);
- objects cannot be appended to (dit_jax.utils.metric_writer rewrites a growing file at a bounded cadence).
gcsfs's directory-listing cache is switched off (unless the user configured fsspec otherwise): it never
expires, so objects another host wrote (sample-many's PNGs, another process's checkpoint) would stay invisible.
"""
from __future__ import annotations

import os
from typing import List, Union

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a backend (it caches the choice)

import fsspec  # noqa: E402
from etils import epath  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402

from dit_jax.utils.errors import DitJaxError  # noqa: E402

Path = epath.Path
PathLike = Union[str, os.PathLike, epath.Path]

# Schemes epath serves (through fsspec: gcsfs, s3fs, adlfs, huggingface_hub); anything else is a local path.
URL_SCHEMES = ("gs://", "s3://", "az://", "hf://")

# Listings straight from the store (see the module docstring); fsspec applies these when it creates a filesystem.
for _protocol in ("gs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


class PathError(DitJaxError, ValueError):
    """A path that names no place dit_jax can read or write (an unknown URL scheme)."""


def is_url(path: PathLike) -> bool:
    """True for a bucket URL such as gs://b/run; False for a local path (relative or absolute)."""
    return os.fspath(path).startswith(URL_SCHEMES)


def as_path(path: PathLike) -> epath.Path:
    """The epath.Path of a user path; local paths are made absolute (against the current directory)."""
    if isinstance(path, epath.Path):
        return path if is_url(path) else epath.Path(os.path.abspath(os.fspath(path)))
    text = os.fspath(path)
    if "://" in text and not is_url(text):
        scheme = text.split("://", 1)[0]
        raise PathError(f"{text}: unsupported URL scheme {scheme!r}; use a local path or one of "
                         f"{', '.join(URL_SCHEMES)}")
    return epath.Path(text) if is_url(text) else epath.Path(os.path.abspath(text))


def display(path: PathLike) -> str:
    """The path as a user wrote it in messages (gs://b/run, /abs/local)."""
    return os.fspath(as_path(path))


def bucket_of(url: PathLike) -> str:
    """gs://bucket/a/b -> gs://bucket."""
    scheme, rest = os.fspath(url).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def join(path: PathLike, *names: str) -> str:
    """`path` / names as text in the user's own form (relative stays relative; for messages and records)."""
    text = os.fspath(path)
    if is_url(text):
        return "/".join([text.rstrip("/"), *names])
    return os.path.join(text, *names)


def is_file(path: PathLike) -> bool:
    """A local file or a bucket object (not a folder or prefix)."""
    p = as_path(path)
    return p.exists() and not p.is_dir()


def _fs(path: epath.Path) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem epath itself uses for a URL (one instance: its caches stay consistent)."""
    return epath_backend.fsspec_backend.fs(os.fspath(path))


def upload(local_file: str, dst: PathLike) -> None:
    """Copies a local file to a bucket object; the object appears only once the upload is complete (an
    interrupted upload leaves nothing at `dst`)."""
    dst = as_path(dst)
    if not is_url(dst):
        raise ValueError(f"{dst}: upload() is for bucket URLs; rename a local file instead")
    _fs(dst).put_file(local_file, os.fspath(dst))


def write_object(dst: PathLike, data: bytes) -> None:
    """`data` as one bucket object, uploaded in one piece (it appears complete or not at all)."""
    dst = as_path(dst)
    if not is_url(dst):
        raise ValueError(f"{dst}: write_object() is for bucket URLs")
    _fs(dst).pipe_file(os.fspath(dst), bytes(data))


def files_below(root: PathLike) -> List[epath.Path]:
    """Every file below `root` (recursive, symbolic links to folders followed locally), sorted by path text."""
    root = as_path(root)
    if is_url(root):
        scheme = os.fspath(root).split("://", 1)[0] + "://"
        found = _fs(root).find(os.fspath(root))  # one paginated listing of the prefix, not one per folder
        return sorted((epath.Path(scheme + p) for p in found), key=os.fspath)
    out = []
    for dirpath, dirs, files in os.walk(os.fspath(root), followlinks=True):
        dirs.sort()
        out += [epath.Path(os.path.join(dirpath, f)) for f in files]
    return sorted(out, key=os.fspath)
