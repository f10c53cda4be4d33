"""orbax checkpoints of the train state: save every N steps (async), keep K, resume from the newest.

Layout: `workdir/checkpoints/<step>/{state,meta}`. `state` holds params, optimizer state, EMA and step;
`meta` (JSON) the step, the seed and the data position, so a resumed run draws the same rngs and batches.
orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a save that is
killed half way is never listed, never resumed, and removed by the next run. Restoring takes the
*target* shardings, so a checkpoint written on one mesh restores onto any other.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from dit_jax.utils.errors import CheckpointError


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
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> Optional[Tuple[int, Dict[str, Any], Dict[str, Any]]]:
    """(step, state, meta) of the newest complete checkpoint, or None when there is none.

    A checkpoint that cannot be read (corrupt files, a different model) raises CheckpointError naming it.
    """
    step = manager.latest_step()
    if step is None:
        return None
    where = os.path.join(str(manager.directory), str(step))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (orbax raises many types; the cause is chained)
        older = [s for s in manager.all_steps() if s < step]
        hint = (f"move it away to resume from step {max(older)}" if older else "move it away to start afresh")
        raise CheckpointError(f"checkpoint {where} could not be restored ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}); it is corrupt or belongs to a "
                              f"different model/optimizer config; {hint}, or set config.checkpoint.resume=False "
                              f"with a new workdir") from e
    meta = dict(restored["meta"])
    if int(meta.get("step", -1)) != step:
        raise CheckpointError(f"checkpoint {where}: meta says step {meta.get('step')}, directory says {step}")
    return step, restored["state"], meta


def latest_saved_step(workdir: str) -> Optional[int]:
    """The newest complete checkpoint step on disk (orbax renames a save into a numeric folder when it is
    complete), without creating anything; None when there is none."""
    d = checkpoint_dir(workdir)
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None
