"""orbax checkpoints of the train state: save every N steps (async), keep K, resume from the newest intact one.

Layout: `workdir/checkpoints/<step>/{state,meta}`. `state` holds params, optimizer state, EMA and step;
`meta` (JSON) the step, the seed, the data position, the config that shaped the state and a checksum of
every array (dit_jax.utils.checksum). orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a save that is killed half way is never listed and is removed by the next run.

Restoring (`restore_latest`) first compares the checkpoint's config with the run's: a field that shapes the
state (the model's dimensions, the optimizer's structure, the seed) that differs is an error naming it, and
nothing on disk changes. Then the newest checkpoint is restored and its checksums verified; one that does
not restore or does not match (flipped bytes, a truncated or empty folder) is moved aside to
`checkpoints/damaged-<step>` with a warning, and the next older one is tried. Restoring takes the *target*
shardings, so a checkpoint written on one mesh restores onto any other. A checkpoint of an older dit_jax,
whose parameters (and EMA and Adam moments) are one subtree per block (`blocks_0` ...; meta has no
"param_layout"), is restored in that layout, verified, then stacked (dit_jax/param_layout.py) with a log line.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from dit_jax.param_layout import is_per_block, stack_blocks, unstack_blocks
from dit_jax.utils.checksum import mismatches, tree_fingerprints
from dit_jax.utils.errors import CheckpointError

log = logging.getLogger("dit_jax.train")
DAMAGED_PREFIX = "damaged-"
LAYOUT_KEY = "param_layout"  # in meta: "stacked" (absent: the older per-block layout)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
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
    asynchronous write starts, from the arrays being saved)."""
    meta = dict(meta, checksums=tree_fingerprints(state), **{LAYOUT_KEY: "per_block" if is_per_block(state)
                                                             else "stacked"})
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _move_aside(manager: ocp.CheckpointManager, step: int, why: str) -> None:
    src = os.path.join(str(manager.directory), str(step))
    dst = os.path.join(str(manager.directory), f"{DAMAGED_PREFIX}{step}-{int(time.time())}")
    log.warning("checkpoint %s is damaged (%s); moved to %s, trying an older one", src, why, dst)
    if jax.process_index() == 0 and os.path.exists(src):
        os.rename(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dit_jax_checkpoint_damaged_{step}")
    manager.reload()


def read_meta(manager: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, state_config: Dict[str, Any]
                   ) -> Optional[Tuple[int, Dict[str, Any], Dict[str, Any]]]:
    """(step, state, meta) of the newest intact checkpoint, or None when there is none (see module docstring).

    `state_config`: the run's fields that shape the state, {"model.hidden_size": 384, ...}.
    """
    where = str(manager.directory)
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = read_meta(manager, step)
        except Exception as e:  # noqa: BLE001  (orbax raises many types for a missing/corrupt meta)
            damaged.append((step, f"its meta cannot be read: {_first_line(e)}"))
            _move_aside(manager, step, damaged[-1][1])
            continue
        diff = config_differences(meta.get("state_config", {}), state_config)
        if diff:
            fields = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(f"checkpoint {where}/{step} was trained with another config ({fields}); "
                                  f"resume with the same values, or use a new --workdir (nothing was changed)")
        per_block = meta.get(LAYOUT_KEY, "per_block") == "per_block"
        target = _per_block_target(abstract_state) if per_block else abstract_state
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  (corrupt files: orbax/tensorstore raise many types)
            damaged.append((step, f"it cannot be restored: {_first_line(e)}"))
            _move_aside(manager, step, damaged[-1][1])
            continue
        bad = mismatches(meta.get("checksums", {}), tree_fingerprints(restored["state"])) if "checksums" in meta \
            else []
        if bad:
            damaged.append((step, f"checksums of {len(bad)} arrays differ, e.g. {bad[0]}"))
            _move_aside(manager, step, damaged[-1][1])
            continue
        if int(meta.get("step", -1)) != step:
            raise CheckpointError(f"checkpoint {where}/{step}: meta says step {meta.get('step')}")
        if damaged:
            log.warning("resuming from step %d: newer checkpoints %s were damaged", step, [d for d, _ in damaged])
        state = restored["state"]
        if per_block:
            log.info("checkpoint %s/%d holds the per-block parameter layout of older dit_jax versions "
                     "(blocks_0 ...); stacked into 'blocks' on restore", where, step)
            state = _stacked_like(state, abstract_state)
        return step, state, meta
    if damaged:
        first, why = damaged[0]
        raise CheckpointError(f"every checkpoint in {where} is damaged (newest: step {first}: {why}; moved to "
                              f"{DAMAGED_PREFIX}{first}-*); set config.checkpoint.resume=False or use a new --workdir")
    return None


def latest_saved_step(workdir: str) -> Optional[int]:
    """The newest complete checkpoint step on disk (orbax renames a save into a numeric folder when it is
    complete), without creating anything; None when there is none."""
    d = checkpoint_dir(workdir)
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None


def to_json_value(v: Any) -> Any:
    """A config value as stored in meta (tuples become lists, like JSON reads them back)."""
    return json.loads(json.dumps(v, default=str))
