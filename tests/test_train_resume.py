"""kill -9 in the middle of training, then the same command again: resumes from the last complete checkpoint."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, tiny_config, train_command
from dit_jax import train

STEPS, EVERY = 24, 3


def _cmd(workdir):
    return train_command(workdir, f"--config.num_steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}",
                         "--config.checkpoint.keep=3", "--config.mesh.num_devices=1")


def _complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path):
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

    r = subprocess.run(_cmd(wd), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint step {last}" in r.stderr
    assert not os.path.exists(fake)  # incomplete saves are cleaned up
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        f.seek(offset)
        resumed = {json.loads(l)["step"]: json.loads(l)["loss"] for l in f if l.strip()}
    assert sorted(resumed) == list(range(last + 1, STEPS + 1))

    cfg = tiny_config(num_steps=STEPS)
    cfg.mesh.num_devices = 1
    ref = train.train_and_evaluate(cfg, str(tmp_path / "uninterrupted")).losses
    for s in resumed:
        assert abs(resumed[s] - ref[s]) <= 1e-6 * abs(ref[s]), (s, resumed[s], ref[s])
