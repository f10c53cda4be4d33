"""SIGTERM -> every process saves one agreed step and exits 0; the same command resumes it exactly."""
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import pytest

from conftest import env_without_xla_flags, run_processes, tiny_config
from dit_jax import train

STEPS = 12


def _run(workdir, sleep_s, on_start=None):
    """The 2-process run (tests/preemption_worker.py); -> the last line each process printed."""
    def cmd(port, i):
        return [sys.executable, "-m", "tests.preemption_worker", str(port), str(i), "2", workdir, str(STEPS),
                str(sleep_s)]

    results = run_processes(cmd, 2, timeout=300, env=env_without_xla_flags(), on_start=on_start)
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-3000:]}"
    return [out.strip().splitlines()[-1] for _, out in results]


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


def _state(workdir, step):
    cfg = tiny_config(num_steps=STEPS)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    got, state, _ = train.load_latest(workdir, train.setup(cfg), cfg)
    assert got == step
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


@pytest.mark.slow
def test_sigterm_to_one_process_saves_an_agreed_step_and_resumes_exactly(tmp_path):
    ref, run = str(tmp_path / "uninterrupted"), str(tmp_path / "preempted")
    _run(ref, 0.0)

    def sigterm_a_few_steps_in(procs):
        deadline = time.time() + 240
        while not any(s >= 3 for s in _logged_steps(run)):  # a few steps in (compiled, training)
            assert time.time() < deadline and all(p.poll() is None for p in procs), "run did not get going"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # the process that is not the coordinator

    said = _run(run, 0.5, on_start=sigterm_a_few_steps_in)
    stopped = {int(s.rsplit("=", 1)[1]) for s in said}
    assert len(stopped) == 1, said  # both processes stopped at the same step...
    (step,) = stopped
    assert 3 < step < STEPS, said
    saved = sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())
    assert saved == [step]  # ...and saved it (every_steps=0: nothing else is saved before the end)

    said = _run(run, 0.0)  # the same command again: resumes and finishes
    assert all(line.endswith("preempted=None") for line in said), said
    a, b = _logged_steps(ref), _logged_steps(run)
    assert sorted(a) == list(range(1, STEPS + 1)) and set(range(step + 1, STEPS + 1)) <= set(b)
    for s in range(1, STEPS + 1):
        if s in b:
            assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (s, a[s], b[s])
    worst = max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
                for x, y in zip(_state(run, STEPS), _state(ref, STEPS)))
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
    assert out.preempted == 3
    assert sorted(int(n) for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()) == [3]
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
