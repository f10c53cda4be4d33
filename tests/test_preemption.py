"""SIGTERM -> every process saves one agreed step and exits 0; the same command resumes it exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dit_jax import checkpoint as ckpt_lib
from dit_jax import train
from tests.test_train_multihost import _free_port
from tests.train_tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _start(workdir, sleep_s):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "preemption_worker.py"), str(port), str(i),
                              "2", workdir, str(STEPS), str(sleep_s)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs, timeout=300):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{o[-3000:]}"
    return outs


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["step"]] = r["loss"]
    return out


def _params(workdir, step):
    cfg = tiny_config(num_steps=STEPS)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    env = train.setup(cfg, workdir)
    mgr = ckpt_lib.make_manager(workdir, 1, 0, async_save=False)
    try:
        assert mgr.latest_step() == step
        _, state, _ = ckpt_lib.restore_latest(mgr, ckpt_lib.abstract_like(env["abstract_state"],
                                                                           env["state_shardings"]))
    finally:
        mgr.close()
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


@pytest.mark.slow
def test_sigterm_to_one_process_saves_an_agreed_step_and_resumes_exactly(tmp_path):
    ref, run = str(tmp_path / "uninterrupted"), str(tmp_path / "preempted")
    _finish(_start(ref, 0.0))

    procs = _start(run, 0.5)
    deadline = time.time() + 240
    while not any(s >= 3 for s in _logged_steps(run)):  # a few steps in (compiled, training)
        assert time.time() < deadline and all(p.poll() is None for p in procs), "run did not get going"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # the process that is not the coordinator
    outs = _finish(procs)
    said = [o.strip().splitlines()[-1] for o in outs]
    stopped = {int(s.rsplit("=", 1)[1]) for s in said}
    assert len(stopped) == 1, said  # both processes stopped at the same step...
    (step,) = stopped
    assert 3 < step < STEPS, said
    saved = sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())
    assert saved == [step]  # ...and saved it (every_steps=0: nothing else is saved before the end)

    outs = _finish(_start(run, 0.0))  # the same command again: resumes and finishes
    assert all(o.strip().splitlines()[-1].endswith("preempted=None") for o in outs)
    a, b = _logged_steps(ref), _logged_steps(run)
    assert sorted(a) == list(range(1, STEPS + 1)) and set(range(step + 1, STEPS + 1)) <= set(b)
    for s in range(1, STEPS + 1):
        if s in b:
            assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (s, a[s], b[s])
    worst = max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
                for x, y in zip(_params(run, STEPS), _params(ref, STEPS)))
    assert worst <= 1e-6, worst


def test_sigterm_single_process_saves_and_stops(tmp_path, monkeypatch):
    """One process: the SIGTERM handler stops the loop at the next step, after saving it."""
    real = train.make_source

    class Kill:
        def __init__(self, src):
            self.src, self.num_examples = src, src.num_examples

        def batch(self, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.src.batch(step)

        def close(self):
            self.src.close()

    monkeypatch.setattr(train, "make_source", lambda c: Kill(real(c)))
    before = signal.getsignal(signal.SIGTERM)
    c = tiny_config(num_steps=6)
    c.mesh.num_devices = 1
    out = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert out["preempted"] == 3
    assert sorted(int(n) for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()) == [3]
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
