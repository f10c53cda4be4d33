"""The stacked parameter layout (dit_jax/nn/param_layout.py) and what older dit_jax versions wrote: converted model
directories and orbax training checkpoints with one `blocks_i` subtree per block still load, with equal values,
and a run resumes from such a checkpoint."""
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import convert
from cli_inprocess import run_main
from conftest import tiny_config
from dit_jax import checkpoint as ckpt_lib
from dit_jax import train
from dit_jax.model import DiT, init_params
from dit_jax.nn.param_layout import is_per_block, stack_blocks, unstack_blocks
from dit_jax.pretrained import config_to_json, load_pretrained
from dit_jax.utils.checksum import tree_fingerprints

CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, mlp_ratio=4.0,
           class_dropout_prob=0.1, num_classes=10, learn_sigma=True)


def _params():
    r = np.random.default_rng(0)
    p = jax.device_get(jax.jit(lambda k: init_params(DiT(**CFG), k))(jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(lambda a: a + 0.05 * r.standard_normal(a.shape).astype(np.float32), p)


def _assert_equal_trees(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stack_unstack_round_trip_and_errors():
    params = _params()
    old = unstack_blocks(params)
    assert sorted(k for k in old if k.startswith("blocks")) == ["blocks_0", "blocks_1", "blocks_2"]
    assert old["blocks_1"]["attn"]["qkv"]["kernel"].shape == (64, 192)
    np.testing.assert_array_equal(old["blocks_1"]["mlp"]["fc2"]["bias"], params["blocks"]["mlp"]["fc2"]["bias"][1])
    assert is_per_block(old) and not is_per_block(params)
    _assert_equal_trees(stack_blocks(old), params)
    _assert_equal_trees(stack_blocks(params), params)  # already stacked: unchanged
    # A train state: params, EMA and the optimizer's moments (dicts inside optax's namedtuples).
    state = {"params": params, "opt": ({"mu": params, "count": np.int32(3)},)}
    _assert_equal_trees(stack_blocks(unstack_blocks(state)), state)
    with pytest.raises(ValueError, match=r"not blocks_0 \.\.\. blocks_1"):
        stack_blocks({k: v for k, v in old.items() if k != "blocks_1"})


def _write_old_model_dir(directory, params):
    """A converted model directory as dit_jax wrote it before the blocks were stacked."""
    old = unstack_blocks(params)
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(config_to_json(CFG), _checksums=tree_fingerprints(old)), f)
    ocp.PyTreeCheckpointer().save(os.path.join(directory, "params"), old)


def test_old_model_directory_loads_and_migrates(tmp_path, caplog):
    params = _params()
    old_dir = str(tmp_path / "old")
    _write_old_model_dir(old_dir, params)
    with caplog.at_level(logging.INFO, logger="dit_jax"):
        model, loaded = load_pretrained(old_dir)
    assert "per-block layout" in caplog.text and "dit-jax-convert migrate" in caplog.text
    _assert_equal_trees(jax.device_get(loaded), params)
    # The release keys are unchanged: old and new layouts give the same state_dict.
    sd_new = convert.flax_to_torch(loaded, CFG, as_numpy=True)
    sd_old = convert.flax_to_torch(unstack_blocks(params), CFG, as_numpy=True)
    assert list(sd_new) == list(sd_old) and "blocks.2.attn.qkv.weight" in sd_new
    for k in sd_new:
        np.testing.assert_array_equal(sd_new[k], sd_old[k])

    new_dir = str(tmp_path / "new")
    r = run_main("dit-jax-convert", "migrate", old_dir, new_dir)  # main(argv) in this process
    assert r.returncode == 0, r.stderr[-2000:]
    on_disk = ocp.PyTreeCheckpointer().restore(os.path.join(new_dir, "params"))
    assert "blocks" in on_disk and not is_per_block(on_disk)
    _, migrated = load_pretrained(new_dir)
    _assert_equal_trees(jax.device_get(migrated), params)
    r = run_main("dit-jax-convert", "migrate", tmp_path / "nope", tmp_path / "out")
    assert r.returncode == 1 and "not a dit_jax directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _write_old_checkpoint(workdir, step, state, meta):
    """A training checkpoint as dit_jax wrote it before the blocks were stacked (dit_jax/checkpoint.py's save of
    then: the state's arrays and a meta with their checksums, no "param_layout")."""
    old = unstack_blocks(jax.device_get(state))
    meta = {k: v for k, v in meta.items() if k != ckpt_lib.LAYOUT_KEY}
    meta["checksums"] = tree_fingerprints(old)
    manager = ocp.CheckpointManager(ckpt_lib.checkpoint_dir(workdir), item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(old), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()


@pytest.mark.slow
def test_old_training_checkpoint_restores_and_resumes(tmp_path, caplog):
    cfg = tiny_config(num_steps=1, **{"model.depth": 2})
    new_wd, old_wd = str(tmp_path / "new"), str(tmp_path / "old")
    train.train_and_evaluate(cfg, new_wd)
    setup = train.setup(cfg)
    step, state, meta = train.load_latest(new_wd, setup, cfg)
    assert step == 1 and meta[ckpt_lib.LAYOUT_KEY] == "stacked"
    _write_old_checkpoint(old_wd, step, state.to_dict(), meta)

    with caplog.at_level(logging.INFO, logger="dit_jax.train"):
        step_old, state_old, _ = train.load_latest(old_wd, setup, cfg)
    assert step_old == 1 and "stacked into 'blocks' on restore" in caplog.text
    _assert_equal_trees(jax.device_get(state_old.to_dict()), jax.device_get(state.to_dict()))
    qkv = state_old.params["blocks"]["attn"]["qkv"]["kernel"]  # placed with the run's shardings
    assert qkv.sharding == setup.state_shardings.params["blocks"]["attn"]["qkv"]["kernel"]

    # The training run itself resumes from it, exactly like from the stacked checkpoint.
    cfg2 = tiny_config(num_steps=2, **{"model.depth": 2})
    from_old, from_new = train.train_and_evaluate(cfg2, old_wd), train.train_and_evaluate(cfg2, new_wd)
    assert sorted(from_old.losses) == [2]
    assert from_old.losses[2] == from_new.losses[2]
    _assert_equal_trees(jax.device_get(from_old.state.to_dict()), jax.device_get(from_new.state.to_dict()))
