"""A real multi-process run: `dit-jax-train` as 2 processes x 4 CPU devices (jax.distributed + gloo) equals
the same run in 1 process x 8 devices: losses, the checkpoint, and the EMA exported with --export-torch
(gathered from both processes)."""
import json
import os

import jax
import numpy as np
import pytest
import torch

import cheap_commands
import convert
from conftest import env_without_xla_flags, rel_err, run_processes, tiny_config, train_command
from dit_jax import train
from dit_jax.pretrained import model_config

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def cheap():
    """The commands' programs cached, process 1's too; one BLAS thread; less GC (tests/cheap_commands.py)."""
    with cheap_commands.settings():
        yield


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(tmp_path):
    mh = str(tmp_path / "multihost")

    def cmd(port, i):
        return train_command(mh, "--config.num_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                             f"--export-torch={tmp_path / 'ema.pt'}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")

    results = run_processes(cmd, 2, env=env_without_xla_flags(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} failed:\n{out[-3000:]}"
    # The same run in this process on its 8 devices, same (data=2, fsdp=4) mesh.
    cfg = tiny_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    ref = train.train_and_evaluate(cfg, str(tmp_path / "single"))
    got = _losses(mh)
    assert sorted(got) == [1, 2, 3]
    for s in (1, 2, 3):
        assert abs(got[s] - ref.losses[s]) <= TOL * abs(ref.losses[s]), (s, got[s], ref.losses[s])
    # The multi-host checkpoint restores here and holds the same state.
    step, state, meta = train.load_latest(mh, train.setup(cfg), cfg)
    assert step == 3 and meta["num_processes"] == 2
    for name in ("params", "ema_params", "opt_state"):
        a = jax.tree_util.tree_leaves(jax.device_get(getattr(state, name)))
        b = jax.tree_util.tree_leaves(jax.device_get(getattr(ref.state, name)))
        assert max(rel_err(x, y) for x, y in zip(a, b) if np.abs(y).max() > 0) < TOL, name
    # --export-torch gathered the EMA from both processes (process_allgather): tensor by tensor equal to the
    # single-process EMA.
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    want = convert.flax_to_torch(jax.device_get(ref.state.ema_params), model_config(ref.model), as_numpy=True)
    assert list(exported) == list(want)
    for k, v in want.items():
        got_k = exported[k].numpy()
        assert (rel_err(got_k, v) < TOL) if np.abs(v).max() > 0 else not np.abs(got_k).any(), k
