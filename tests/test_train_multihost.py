"""A real multi-process run: 2 processes x 4 CPU devices (jax.distributed + gloo) equal 1 process x 8."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dit_jax import checkpoint as ckpt_lib
from dit_jax import train
from dit_jax.pretrained import model_config
from conftest import rel_err
from tests.train_tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(tmp_path):
    mh = str(tmp_path / "multihost")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), str(port),
                               str(i), "2", mh], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{o[-3000:]}"
    # The same run in this process on its 8 devices, same (data=2, fsdp=4) mesh.
    cfg = tiny_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    ref = train.train_and_evaluate(cfg, str(tmp_path / "single"))
    got = _losses(mh)
    assert sorted(got) == [1, 2, 3]
    for s in (1, 2, 3):
        assert abs(got[s] - ref["losses"][s]) <= TOL * abs(ref["losses"][s]), (s, got[s], ref["losses"][s])
    # The multi-host checkpoint restores here and holds the same parameters.
    env8 = train.setup(cfg, mh)
    mgr = ckpt_lib.make_manager(mh, 1, 0, async_save=False)
    step, state, meta = ckpt_lib.restore_latest(mgr, ckpt_lib.abstract_like(env8["abstract_state"],
                                                                            env8["state_shardings"]))
    mgr.close()
    assert step == 3 and meta["num_processes"] == 2
    a = jax.tree_util.tree_leaves(jax.device_get(state["params"]))
    b = jax.tree_util.tree_leaves(jax.device_get(ref["state"]["params"]))
    assert max(rel_err(x, y) for x, y in zip(a, b)) < TOL
