"""orbax checkpoints of the train state: save every N steps (async), keep K, resume from the newest intact one.

Layout: `workdir/checkpoints/<step>/{state,meta}`; workdir is a local path or a bucket URL (gs://...), given
to orbax unchanged (dit_jax.utils.paths). `state` holds params, optimizer state, EMA and step; `meta`
(JSON) the step, the seed, the data position, the config that shaped the state and a checksum of every
array (dit_jax.utils.checksum). orbax lists only complete saves: locally a save is written into
`<step>.orbax-checkpoint-tmp-*` and renamed when complete, on a bucket `<step>/commit_success.txt` is written
last; an incomplete save is never listed and orbax removes it at the next start.

Restoring (`restore_latest`) is a decision all processes take together, from the same data, before
anything is renamed. For the newest listed step, in phases (each one ends with one all-gather of a few
integers per process: its verdict and a digest of what it read):
1. meta is read and parsed on every process; the digests of its text must agree. A field that shapes the
   state (the model's dimensions, the optimizer's structure, the seed) that differs from the run's config
   is an error naming it, and nothing changes.
2. the state is restored into the run's target shardings (each process reads the shards it holds) and
   checksummed shard by shard; the processes' partial sums are added up and compared with meta's.

"Damaged" needs evidence that reading again cannot change:
- a checksum differs (the bytes decode, the values are not the ones saved);
- a file the checkpoint needs is missing: FileNotFoundError, tensorstore NOT_FOUND (a deleted array or
  manifest, an item folder that is not there, an empty numbered folder);
- stored bytes do not decode: JSON that does not parse, tensorstore DATA_LOSS, OUT_OF_RANGE (a file shorter
  than its index says) or FAILED_PRECONDITION naming corrupt/truncated compressed data.
Damage found by any process is the verdict of all of them (a corrupt shard may be read by one process).
Any other exception is not evidence: an OSError or timeout from storage, an HTTP 5xx after the client's own
retries, RESOURCE_EXHAUSTED (out of memory), anything unknown. Then every process retries the same phase
together (ATTEMPTS tries, waiting BACKOFF_S, 2*BACKOFF_S, ...) and, when it still fails, the run stops with
one line naming the step and the error (CheckpointError); nothing is renamed.

A damaged step is moved aside by process 0 once all processes agreed, then every process tries the next
older one. Locally that is one rename to `checkpoints/damaged-<step>-<time>`. On a bucket, where objects
cannot be renamed, process 0 copies every object of the step there (server-side), the step's
commit_success.txt last, then deletes the step's commit_success.txt first and the rest after it: cut off
half way, either the copy or the step lacks its commit file, so orbax treats that folder as an incomplete
save and removes it at the next start, and the other one is complete. Restoring takes the *target*
shardings, so a checkpoint written on one mesh restores onto any other.

A checkpoint of an older dit_jax, whose parameters (and EMA and Adam moments) are one subtree per block
(`blocks_0` ...; meta has no "param_layout"), is restored and verified in that layout, then stacked
(dit_jax/nn/param_layout.py) onto the target shardings, with a log line.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from etils.epath import backend as epath_backend
from jax.sharding import NamedSharding, PartitionSpec

from dit_jax.nn.param_layout import is_per_block, stack_blocks, unstack_blocks
from dit_jax.utils import checksum
from dit_jax.utils.errors import CheckpointError
from dit_jax.utils.paths import PathLike, as_path, is_url

log = logging.getLogger("dit_jax.train")
DAMAGED_PREFIX = "damaged-"
LAYOUT_KEY = "param_layout"  # in meta: "stacked" (absent: the older per-block layout)
COMMIT_FILE = "commit_success.txt"  # orbax's marker of a complete save on a bucket
ATTEMPTS = 3  # tries of one restore phase before the run stops (storage clients also retry inside each)
BACKOFF_S = 2.0  # wait before the second try, doubled for each further one

OK, DAMAGED, FAILED = 0, 1, 2  # one process's verdict on one phase


def checkpoint_dir(workdir: PathLike) -> epath.Path:
    return as_path(workdir) / "checkpoints"


def make_manager(workdir: PathLike, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        save_interval_steps=1,  # the train loop decides when to save
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # remove saves that a killed run left incomplete
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Save `state` (a dict of arrays) with `meta` plus the checksums of its arrays (computed before the
    asynchronous write starts, from the arrays being saved; every process calls it)."""
    meta = dict(meta, checksums=checksum.tree_fingerprints(state),
                **{LAYOUT_KEY: "per_block" if is_per_block(state) else "stacked"})
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Evidence
# ----------------------------------------------------------------------------------------------------
_MISSING_OR_UNDECODABLE = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")  # tensorstore status codes
_CORRUPT_WORDS = ("corrupt", "truncated", "decompress", "checksum mismatch", "invalid", "malformed")


def _causes(e: BaseException):
    """e and what it was raised from (`raise ... from`: orbax wraps tensorstore's errors so). Not the
    exceptions it was raised while handling: a missing file that some code handled is no evidence."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__


def is_damage_evidence(e: BaseException) -> bool:
    """Whether an exception from reading a checkpoint proves it damaged (see the module docstring): a
    missing file or bytes that do not decode. Storage errors, timeouts and out-of-memory are not."""
    for x in _causes(e):
        if isinstance(x, (FileNotFoundError, json.JSONDecodeError)):
            return True
        m = re.match(r"([A-Z_]+): ", str(x))
        if m and m.group(1) in _MISSING_OR_UNDECODABLE:
            return True
        if m and m.group(1) == "FAILED_PRECONDITION" and any(w in str(x).lower() for w in _CORRUPT_WORDS):
            return True
    return False


def _gather_rows(row: np.ndarray) -> np.ndarray:
    """(processes, len(row)) uint32: every process's row (a collective; just the row with one process)."""
    row = np.asarray(row, np.uint32)
    return row[None] if jax.process_count() == 1 else checksum.gather(row).reshape(-1, row.shape[0])


class _Damaged(Exception):
    pass


def _together(what: str, damage: str, where: str, fn: Callable[[], Any], digest: Callable[[Any], List[int]],
              width: int):
    """fn() on every process, retried together until no process fails; -> (value, digests of all processes).

    `what`: the phase ("reading its meta"); `damage`: how its damage is worded ("it cannot be restored").
    `digest(value)`: `width` integers that are gathered with the verdict. Raises _Damaged when any process
    found damage, CheckpointError when some process still fails after ATTEMPTS tries."""
    for attempt in range(ATTEMPTS):
        value, why = None, ""
        try:
            value = fn()
            verdict, extra = OK, list(digest(value))
        except Exception as e:  # noqa: BLE001  (classified: damage evidence or a failure to retry)
            verdict, why, extra = (DAMAGED if is_damage_evidence(e) else FAILED), _first_line(e), [0] * width
        rows = _gather_rows(np.asarray([verdict] + extra, np.uint32))
        verdicts = rows[:, 0]
        if (verdicts == DAMAGED).any():
            who = [int(i) for i in np.flatnonzero(verdicts == DAMAGED)]
            raise _Damaged(f"{damage}: {why}" if verdict == DAMAGED else f"{damage} on process {who}")
        failed = [int(i) for i in np.flatnonzero(verdicts == FAILED)]
        if not failed:
            return value, rows[:, 1:]
        detail = why or f"failed on process {failed}"
        log.warning("checkpoint %s: %s failed (%s); try %d of %d", where, what, detail, attempt + 1, ATTEMPTS)
        if attempt + 1 < ATTEMPTS:
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise CheckpointError(f"checkpoint {where}: {what} failed {ATTEMPTS} times ({detail}); this is not "
                          f"evidence of damage, so nothing was renamed; rerun when the storage answers")


def _read_meta(step_dir: epath.Path) -> Dict[str, Any]:
    handler = ocp.JsonCheckpointHandler()
    try:
        return dict(handler.restore(step_dir / "meta", args=ocp.args.JsonRestore()))
    finally:
        handler.close()


def _restore_state(step_dir: epath.Path, abstract_state: Any) -> Any:
    # The handler, not the manager: Checkpointer.restore ends with a barrier that a process whose read
    # failed would skip; here every process's outcome meets the others' in `_together` instead.
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.restore(step_dir / "state", args=ocp.args.StandardRestore(abstract_state))
    finally:
        handler.close()


def _meta_digest(meta: Dict[str, Any]) -> List[int]:
    return [zlib.crc32(json.dumps(meta, sort_keys=True, default=str).encode())]


def read_meta(manager: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
    return _read_meta(as_path(manager.directory) / str(step))


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{field: (in the checkpoint, now)} of the fields of `current` that the checkpoint has and that differ."""
    return {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}


def _per_block_target(abstract_state: Any) -> Any:
    """The abstract state in the older per-block layout: each stacked array's slices, sharded like it but
    without the (never sharded) depth axis."""
    def take(x, i):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)

    return unstack_blocks(abstract_state, take)


def _stacked_like(state: Any, abstract_state: Any) -> Any:
    """A restored per-block state stacked on the devices, placed with `abstract_state`'s shardings."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_state)
    return jax.jit(lambda s: stack_blocks(s, lambda xs: jnp.stack(xs)), out_shardings=shardings)(state)


def _verify(where: str, step_dir: epath.Path, abstract_state: Any, state_config: Dict[str, Any]):
    """(state, meta) of one step, or _Damaged / CheckpointError, the same on every process."""
    meta, digests = _together("reading its meta", "its meta cannot be read", where, lambda: _read_meta(step_dir),
                              _meta_digest, 1)
    if len(set(digests[:, 0].tolist())) > 1:  # not the same bytes everywhere: never decide on that
        raise CheckpointError(f"checkpoint {where}: the processes read different meta files; nothing was "
                              f"renamed; rerun when the storage answers consistently")
    diff = config_differences(meta.get("state_config", {}), state_config)
    if diff:
        fields = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {where} was trained with another config ({fields}); "
                              f"resume with the same values, or use a new --workdir (nothing was changed)")
    per_block = meta.get(LAYOUT_KEY, "per_block") == "per_block"  # written before the stacked layout
    target = _per_block_target(abstract_state) if per_block else abstract_state
    n = len(jax.tree_util.tree_leaves(target))

    def restore_and_sum():
        state = _restore_state(step_dir, target)
        return state, checksum.local_partials(state)

    (state, partials), shares = _together("restoring it", "it cannot be restored", where, restore_and_sum,
                                          lambda v: v[1].values, n)
    if "checksums" in meta:
        bad = checksum.mismatches(meta["checksums"], partials.total(shares))
        if bad:  # the same on every process: the sums are the all-gathered ones
            raise _Damaged(f"checksums of {len(bad)} arrays differ, e.g. {bad[0]}")
    if int(meta.get("step", -1)) != int(step_dir.name):
        raise CheckpointError(f"checkpoint {where}: meta says step {meta.get('step')}")
    if per_block and is_per_block(state):
        log.info("checkpoint %s holds the per-block parameter layout of older dit_jax versions (blocks_0 ...); "
                 "stacked into 'blocks' on restore", where)
        state = _stacked_like(state, abstract_state)
    return state, meta


# ----------------------------------------------------------------------------------------------------
# Moving a damaged step aside
# ----------------------------------------------------------------------------------------------------
def _bucket_fs(path: epath.Path):
    """The fsspec filesystem epath reads `path` through (its listings cache is the one to refresh)."""
    return epath_backend.fsspec_backend.fs(os.fspath(path))


def _copy_then_delete(src: epath.Path, dst: epath.Path) -> None:
    """A bucket's stand-in for rename (see the module docstring for the order)."""
    fs = _bucket_fs(src)
    s, d = os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/")
    files = sorted(fs.find(s))  # object paths without the scheme
    root = s.split("://", 1)[-1]
    commit = f"{root}/{COMMIT_FILE}"
    rest = [f for f in files if f != commit]
    scheme = s.split("://", 1)[0] + "://"
    fs.copy([scheme + f for f in rest], [d + f[len(root):] for f in rest])
    if commit in files:
        fs.copy(scheme + commit, f"{d}/{COMMIT_FILE}")
        fs.rm(scheme + commit)
    fs.rm(s, recursive=True)
    fs.invalidate_cache()


def _move(src: epath.Path, dst: epath.Path) -> None:
    if is_url(src):
        _copy_then_delete(src, dst)
    else:
        os.rename(os.fspath(src), os.fspath(dst))  # one atomic rename


def _refresh_listings(directory: epath.Path) -> None:
    """Forget cached bucket listings (another process may have moved a step)."""
    if is_url(directory):
        _bucket_fs(directory).invalidate_cache()


def _move_aside(manager: ocp.CheckpointManager, step: int, why: str) -> None:
    """Process 0 moves the step that all processes found damaged aside; all then reload the listing."""
    directory = as_path(manager.directory)
    src = directory / str(step)
    dst = directory / f"{DAMAGED_PREFIX}{step}-{int(time.time())}"
    error = ""
    if jax.process_index() == 0:
        log.warning("checkpoint %s is damaged (%s); moved to %s, trying an older one", src, why, dst)
        try:
            _move(src, dst)
        except Exception as e:  # noqa: BLE001  (reported to every process below)
            error = _first_line(e)
    else:
        log.warning("checkpoint %s is damaged (%s); process 0 moves it aside, trying an older one", src, why)
    rows = _gather_rows(np.asarray([FAILED if error else OK], np.uint32))
    if (rows[:, 0] != OK).any():
        raise CheckpointError(f"checkpoint {src} is damaged ({why}) but could not be moved aside"
                              f"{': ' + error if error else ' (see process 0)'}; move it away, then rerun")
    _refresh_listings(directory)
    manager.reload()


# ----------------------------------------------------------------------------------------------------
# Restoring
# ----------------------------------------------------------------------------------------------------
def _listed_steps(manager: ocp.CheckpointManager) -> List[int]:
    """The complete steps, newest first, the same list on every process (or CheckpointError)."""
    where = os.fspath(manager.directory)
    steps: List[int] = []
    for attempt in range(ATTEMPTS):
        steps = sorted(manager.all_steps(), reverse=True)
        rows = _gather_rows(np.asarray([zlib.crc32(json.dumps(steps).encode())], np.uint32))
        if len(set(rows[:, 0].tolist())) == 1:
            return steps
        log.warning("checkpoints in %s: the processes list different steps; listing again", where)
        time.sleep(BACKOFF_S * 2 ** attempt)
        _refresh_listings(as_path(manager.directory))
        manager.reload()
    raise CheckpointError(f"checkpoints in {where}: the processes list different steps (this one: {steps}); "
                          f"nothing was renamed; rerun when the storage answers consistently")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, state_config: Dict[str, Any]
                   ) -> Optional[Tuple[int, Dict[str, Any], Dict[str, Any]]]:
    """(step, state, meta) of the newest intact checkpoint, or None when there is none (see module docstring).
    Every process calls it; all return the same step or raise the same error.

    `state_config`: the run's fields that shape the state, {"model.hidden_size": 384, ...}.
    """
    directory = as_path(manager.directory)
    damaged = []
    for step in _listed_steps(manager):
        where = f"{os.fspath(directory)}/{step}"
        try:
            state, meta = _verify(where, directory / str(step), abstract_state, state_config)
        except _Damaged as e:
            damaged.append((step, str(e)))
            _move_aside(manager, step, str(e))
            continue
        if damaged:
            log.warning("resuming from step %d: newer checkpoints %s were damaged", step, [d for d, _ in damaged])
        return step, state, meta
    if damaged:
        first, why = damaged[0]
        raise CheckpointError(f"every checkpoint in {os.fspath(directory)} is damaged (newest: step {first}: {why}; "
                              f"moved to {DAMAGED_PREFIX}{first}-*); set config.checkpoint.resume=False or use "
                              f"a new --workdir")
    return None


def latest_saved_step(workdir: PathLike) -> Optional[int]:
    """The newest complete checkpoint step (orbax's listing: locally a numeric folder, on a bucket one with
    its commit file), without creating anything; None when there is none."""
    d = checkpoint_dir(workdir)
    steps = ocp.path.step.checkpoint_steps(d) if d.exists() else []
    return max(steps) if steps else None


def to_json_value(v: Any) -> Any:
    """A config value as stored in meta (tuples become lists, like JSON reads them back)."""
    return json.loads(json.dumps(v, default=str))
