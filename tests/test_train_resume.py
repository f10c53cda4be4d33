"""kill -9 in the middle of training (and in the middle of a checkpoint write), then the same command again:
it resumes from the last complete checkpoint and ends with exactly the state of an uninterrupted run.

The killed command is a real process; the same command again runs through dit-jax-train's main(argv) in this
process (tests/cli_inprocess.py), on the same devices and program (one of the 8 simulated devices)."""
import json
import os
import signal
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_inprocess import run_main
from conftest import ROOT, tiny_config, train_command
from dit_jax import train

STEPS, EVERY = 24, 3


def _cmd(workdir):
    return train_command(workdir, f"--config.num_steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}",
                         "--config.checkpoint.keep=3", "--config.mesh.num_devices=1")


def _config():
    cfg = tiny_config(num_steps=STEPS)
    cfg.mesh.num_devices = 1
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference both tests compare with: the same run in this process, never stopped."""
    return train.train_and_evaluate(_config(), str(tmp_path_factory.mktemp("uninterrupted")))


def _complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    wd = str(tmp_path / "run")
    p = subprocess.Popen(_cmd(wd), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(_complete_steps(wd)) < 3 and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None, "training ended before it could be killed:\n" + p.stderr.read()[-3000:]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    done = _complete_steps(wd)
    last = done[-1]
    assert 2 * EVERY <= last < STEPS, done
    # A save that was cut off: orbax's temporary directory for a later step. It must not be resumed.
    fake = os.path.join(wd, "checkpoints", f"{last + EVERY}.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(fake, "state"), exist_ok=True)
    with open(os.path.join(fake, "state", "garbage"), "w") as f:
        f.write("half written")
    offset = os.path.getsize(os.path.join(wd, "metrics.jsonl"))

    r = run_main("dit-jax-train", *_cmd(wd)[3:])  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint step {last}" in r.stderr
    assert not os.path.exists(fake)  # incomplete saves are cleaned up
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        f.seek(offset)
        resumed = {json.loads(l)["step"]: json.loads(l)["loss"] for l in f if l.strip()}
    assert sorted(resumed) == list(range(last + 1, STEPS + 1))

    ref = uninterrupted
    for s in resumed:
        assert abs(resumed[s] - ref.losses[s]) <= 1e-6 * abs(ref.losses[s]), (s, resumed[s], ref.losses[s])
    assert_same_state(wd, _config(), ref)


def assert_same_state(workdir, cfg, ref):
    """The final checkpoint of `workdir` holds the uninterrupted run's params, EMA and optimizer state."""
    step, state, _ = train.load_latest(str(workdir), train.setup(cfg), cfg)
    assert step == STEPS
    for name in ("params", "ema_params", "opt_state"):
        got = jax.tree_util.tree_leaves(jax.device_get(getattr(state, name)))
        want = jax.tree_util.tree_leaves(jax.device_get(getattr(ref.state, name)))
        worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) /
                          max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30)) for a, b in zip(got, want))
        assert worst <= 1e-6, (name, worst)


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_then_resumed(tmp_path, uninterrupted):
    """SIGKILL while orbax is writing a save (its temporary folder exists): that save is never resumed."""
    wd = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "tests.kill_in_save_worker", "3", "--"] + _cmd(wd)[3:]  # the 3rd save: step 9
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    m = re.search(r"killing during the save of step (\d+) \((\S+)\)", r.stderr)
    assert m and ".orbax-checkpoint-tmp" in m.group(2), r.stderr[-3000:]
    seen = m.group(2)
    interrupted_step = int(seen.split(".")[0])
    before = _complete_steps(wd)
    assert interrupted_step not in before and before, (seen, before)
    r = run_main("dit-jax-train", *_cmd(wd)[3:])  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint step {max(before)}" in r.stderr
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if ".orbax-checkpoint-tmp" in n]
    assert_same_state(wd, _config(), uninterrupted)
