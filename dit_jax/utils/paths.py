"""The one path type of dit_jax: `etils.epath.Path`, for local paths and URLs alike (`gs://`, `s3://`, ...).

Every path a command reads or writes goes through `as_path` (never `os.path.abspath` or `open` on a user
path): `gs://bucket/run` stays a bucket path, `runs/x` stays a local one. orbax, which writes the
checkpoints, takes the same paths.

Backend: epath reads buckets through fsspec (gcsfs for gs://) unless TensorFlow is installed, when it would
switch to tf.io.gfile. dit_jax pins the fsspec backend (EPATH_USE_TF=false unless the user set it): one
backend whether or not the data extra is installed, and the one the tests run against a GCS emulator on
127.0.0.1 (tf.io.gfile ignores STORAGE_EMULATOR_HOST and always calls Google's endpoint). Set
EPATH_USE_TF=true before starting a command to use tf.io.gfile instead.
"""
from __future__ import annotations

import os
from typing import Union

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a backend (it caches the choice)

from etils import epath  # noqa: E402

Path = epath.Path
PathLike = Union[str, os.PathLike, epath.Path]

# Schemes epath serves (through fsspec: gcsfs, s3fs, adlfs, huggingface_hub); anything else is a local path.
URL_SCHEMES = ("gs://", "s3://", "az://", "hf://")


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
        raise ValueError(f"{text}: unsupported URL scheme {scheme!r}; use a local path or one of "
                         f"{', '.join(URL_SCHEMES)}")
    return epath.Path(text) if is_url(text) else epath.Path(os.path.abspath(text))


def display(path: PathLike) -> str:
    """The path as a user wrote it in messages (gs://b/run, /abs/local)."""
    return os.fspath(as_path(path))
