"""Stopping together: SIGTERM or Ctrl-C to one process of a 2-process `dit-jax-train` on a bucket (gs:// on the
GCS emulator) stops both at the same step, saved; SIGTERM exits 75 and the same command resumes exactly;
a SIGTERM during an evaluation or a sample grid stops it between its batches.

The SIGTERM, Ctrl-C and SIGTERM-during-evaluations tests read one chain of 2-process runs (`stopped_and_resumed`,
three starts instead of six; each start costs ~12 CPU seconds): every stop is also resumed, the first run
evaluates after every step so that its SIGTERM lands in an evaluation, and the uninterrupted reference is
trained by the processes of the last run."""
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

import cheap_commands
from cli_inprocess import run_main
from conftest import ROOT, env_without_xla_flags, free_port, rel_err, tiny_config, train_command
from dit_jax import checkpoint as ckpt_lib, train
from dit_jax.training import sample_quality as train_eval
from gcs_emulator import BUCKET

STEPS = 12  # room for two stops a few steps apart (SIGTERM at ~5, Ctrl-C at ~8) and a few steps after them
EXIT_PREEMPTED = 75  # the documented status of a preempted run (docs/training.md)
LOCAL = ("cwd", "home", "tmp")  # the workers' working folder, HOME and TMPDIR


@pytest.fixture(scope="module", autouse=True)
def cheap():
    """The commands' programs cached, process 1's too; one BLAS thread; less GC (tests/cheap_commands.py)."""
    with cheap_commands.settings():
        yield


def run_two(workdir, tmp_path, sleep_s=0.0, flags=(), on_start=None, env=None):
    """tests/preemption_worker.py as 2 processes, started in an empty folder -> [(returncode, output)].

    Output goes to files (tmp_path/out.I): a pipe nobody reads while `on_start` waits would fill up and
    stop that process in the middle of the run, and the other one with it at the next collective."""
    progress = str(tmp_path / "progress")
    local = {name: tmp_path / name for name in LOCAL}  # empty folders: the run must leave them empty
    for d in local.values():
        d.mkdir(parents=True, exist_ok=True)
    cwd = local["cwd"]
    env = env_without_xla_flags(PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                                HOME=str(local["home"]), TMPDIR=str(local["tmp"]), **(env or {}))
    for attempt in range(3):
        port = free_port()
        logs = [open(tmp_path / f"out.{i}", "w+") for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-m", "tests.preemption_worker", str(port), str(i), "2", workdir,
                                   str(sleep_s), progress, *flags], cwd=str(cwd), env=env, stdout=logs[i],
                                  stderr=subprocess.STDOUT) for i in range(2)]
        try:
            if on_start is not None:
                on_start(procs)
            deadline = time.time() + 400
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outs = []
        for f in logs:
            f.seek(0)
            outs.append(f.read())
            f.close()
        if not any("Address already in use" in out for out in outs):
            break
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def reached(tmp_path) -> int:
    """The largest step any worker asked its data for."""
    steps = [int(p.read_text() or 0) for p in tmp_path.glob("progress.*") if p.read_text()]
    return max(steps, default=0)


def signal_a_few_steps_in(tmp_path, sig, which=1, step=4):
    """on_start for `run_two`: `sig` to process `which` once a worker asked for the data of `step` (a resumed
    run passes the step it resumes from plus a few: compiled and a few steps in)."""
    def on_start(procs):
        deadline = time.time() + 240
        while reached(tmp_path) < step:  # compiled and a few steps in
            assert time.time() < deadline and all(p.poll() is None for p in procs), "run did not get going"
            time.sleep(0.1)
        procs[which].send_signal(sig)  # by default the process that is not the coordinator
    return on_start


def bucket_steps(workdir):
    d = ckpt_lib.checkpoint_dir(workdir)
    ckpt_lib._refresh_listings(d)  # this process may have listed the folder before the run changed it
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def saved_step(out: str, what: str) -> int:
    m = re.findall(rf"{what}: saved step (\d+)", out)
    assert len(m) == 1, out[-3000:]
    return int(m[0])


def final_state(workdir, step):
    cfg = tiny_config(num_steps=STEPS)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    got, state, _ = train.load_latest(workdir, train.setup(cfg), cfg)
    assert got == step
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


def assert_nothing_local(tmp_path):
    """The run wrote nothing to the local disk: not in its working folder (a bucket path taken for a local
    one would appear there as gs:/...), its home or its temporary folder."""
    for name in LOCAL:
        assert not os.listdir(tmp_path / name), (name, os.listdir(tmp_path / name))


EVAL_EVERY_STEP = ["--config.eval.every_steps=1", "--config.eval.num_samples=40", "--config.eval.batch_size=4",
                   "--config.eval.respacing=ddim2"]


@pytest.fixture(scope="module")
def stopped_and_resumed(gcs_emulator, tmp_path_factory):
    """One 2-process run on a bucket stopped twice and resumed, and the same run uninterrupted:
        sigterm   the run with an evaluation after every step (10 sampling calls each, no sleep in
                  the data: the evaluations take most of a step), SIGTERM to process 1 a few
                  steps in, so that it mostly lands inside an evaluation                        (exit 75)
        ctrl_c    the same command again, Ctrl-C to process 1 a few steps after it resumed      (exit 130)
        resumed   the same command again, to STEPS; then the same processes train the
                  uninterrupted reference from scratch (tests/preemption_worker.py)              (exit 0)
    -> {stage: [(returncode, output)] of both processes, "saved after STAGE": the checkpoint steps then,
    "ref"/"run": the workdirs, "tmp": the stages' local folders (tmp/STAGE)}."""
    tmp = tmp_path_factory.mktemp("preemption")
    root = f"gs://{BUCKET}/preemption-{uuid.uuid4().hex[:8]}"
    c = {"ref": f"{root}/uninterrupted", "run": f"{root}/preempted", "tmp": tmp}
    flags = [f"--config.num_steps={STEPS}"]
    # Evaluations change no training state (they draw their own noise): the later runs and the reference do without.
    c["sigterm"] = run_two(c["run"], tmp / "sigterm", sleep_s=0.0, flags=flags + EVAL_EVERY_STEP,
                           on_start=signal_a_few_steps_in(tmp / "sigterm", signal.SIGTERM))
    c["saved after sigterm"] = bucket_steps(c["run"])
    resumed_at = max(c["saved after sigterm"], default=0)
    c["ctrl_c"] = run_two(c["run"], tmp / "ctrl_c", sleep_s=0.5, flags=flags,
                          on_start=signal_a_few_steps_in(tmp / "ctrl_c", signal.SIGINT, step=resumed_at + 2))
    c["saved after ctrl_c"] = bucket_steps(c["run"])
    c["resumed"] = run_two(c["run"], tmp / "resumed", flags=flags, env={"DIT_TEST_THEN_TRAIN": c["ref"]})
    return c


@pytest.mark.slow
def test_sigterm_to_one_process_on_a_bucket_stops_both_saved_and_resumes_exactly(stopped_and_resumed):
    c = stopped_and_resumed
    results = c["sigterm"]
    for i, (rc, out) in enumerate(results):
        assert rc == EXIT_PREEMPTED, f"process {i} exited {rc}:\n{out[-3000:]}"
    steps = {saved_step(out, r"preempted \(SIGTERM\)") for _, out in results}
    assert len(steps) == 1, steps  # both processes stopped at the same step...
    (step,) = steps
    assert 4 <= step < STEPS, step
    assert c["saved after sigterm"] == [step]  # ...and saved it (every_steps=0: nothing else before the end)

    for i, (rc, out) in enumerate(c["ctrl_c"]):  # the same command again (stopped by Ctrl-C: the next test)
        assert f"resumed from checkpoint step {step}" in out, f"process {i}:\n{out[-3000:]}"
    after_ctrl_c = c["saved after ctrl_c"][-1]
    for i, (rc, out) in enumerate(c["resumed"]):  # and again, to the end (then the uninterrupted run)
        assert rc == 0, f"process {i} exited {rc}:\n{out[-3000:]}"
        assert f"resumed from checkpoint step {after_ctrl_c}" in out
    worst = max(rel_err(x, y) for x, y in zip(final_state(c["run"], STEPS), final_state(c["ref"], STEPS))
                if np.abs(y).max())
    assert worst <= 1e-6, worst
    for stage in ("sigterm", "ctrl_c", "resumed"):
        assert_nothing_local(c["tmp"] / stage)


@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_both_at_the_same_step_saved(stopped_and_resumed):
    c = stopped_and_resumed
    run, results = c["run"], c["ctrl_c"]
    for i, (rc, out) in enumerate(results):
        assert rc == 130, f"process {i} exited {rc}:\n{out[-3000:]}"
    steps = {saved_step(out, r"interrupted \(Ctrl-C\)") for _, out in results}
    assert len(steps) == 1, steps
    (step,) = steps
    # Saved, and nothing else since the SIGTERM's save this run resumed from (checkpoint.keep=2 keeps both).
    before = c["saved after sigterm"]
    assert len(before) == 1 and before[0] < step < STEPS and c["saved after ctrl_c"] == before + [step], (before, step)
    for _, out in results:
        last = [line for line in out.strip().splitlines() if line][-1]
        assert last.startswith(f"dit-jax-train: interrupted; the last checkpoint is step {step} in {run}/"), last
    assert_nothing_local(c["tmp"] / "ctrl_c")


@pytest.mark.slow
def test_sigterm_during_evaluations_stops_both_processes_at_the_same_call(stopped_and_resumed):
    """An evaluation after every step, 10 sampling calls each, so a SIGTERM mostly lands inside one: both
    processes stop at the same step, inside the same evaluation or both at a step boundary (the first run
    of `stopped_and_resumed`)."""
    c = stopped_and_resumed
    results = c["sigterm"]
    for i, (rc, out) in enumerate(results):
        assert rc == EXIT_PREEMPTED, f"process {i} exited {rc}:\n{out[-3000:]}"
    steps = {saved_step(out, r"preempted \(SIGTERM\)") for _, out in results}
    assert len(steps) == 1, steps
    inside = [re.findall(r"preempted: stopping the evaluation of step (\d+)", out) for _, out in results]
    assert inside[0] == inside[1], inside
    assert c["saved after sigterm"] == [steps.pop()]


class _SigtermAtStep:
    """A training source that sends this process SIGTERM when batch `step` is asked for."""

    def __init__(self, src, step=2):
        self.src, self.num_examples, self.step = src, src.num_examples, step

    def batch(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.src.batch(step)

    def close(self):
        self.src.close()


def test_sigterm_single_process_saves_and_stops(tmp_path, monkeypatch):
    """One process: the SIGTERM handler stops the loop at the next step, after saving it."""
    real = train.make_source
    monkeypatch.setattr(train, "make_source", lambda c: _SigtermAtStep(real(c)))
    before = signal.getsignal(signal.SIGTERM)
    c = tiny_config(num_steps=6)
    c.mesh.num_devices = 1
    out = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert out.preempted == 3
    assert sorted(int(n) for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()) == [3]
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again


def test_preempted_command_exits_75(tmp_path, monkeypatch):
    """dit-jax-train's main (in this process; the 2-process test below starts the command) returns 75 after a
    SIGTERM, the "try again" status schedulers restart on, not 1 (a failure) or 0 (finished)."""
    real = train.make_source
    monkeypatch.setattr(train, "make_source", lambda c: _SigtermAtStep(real(c)))
    r = run_main("dit-jax-train", *train_command(tmp_path / "w", "--config.num_steps=6", "--config.mesh.num_devices=1",
                                                 "--config.checkpoint.every_steps=0")[3:])
    assert r.returncode == 75, r.stderr[-3000:]
    assert sorted(int(n) for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()) == [3]


def _sigterm_on_call(real_make, module, name, monkeypatch, on_call=2):
    """`module.name` (make_sampler) returns the real sampler, which sends this process SIGTERM during its
    `on_call`-th call (the signal arrives while a grid or an evaluation is being sampled)."""
    calls = []

    def make(*args, **kwargs):
        sample = real_make(*args, **kwargs)

        def sample_and_maybe_kill(*a):
            calls.append(1)
            if len(calls) == on_call:
                os.kill(os.getpid(), signal.SIGTERM)
            return sample(*a)
        return sample_and_maybe_kill

    monkeypatch.setattr(module, name, make)
    return calls


@pytest.mark.parametrize("during", ["evaluation", "sample grid"])
def test_sigterm_during_evaluation_or_sampling_stops_it_and_saves(tmp_path, monkeypatch, during):
    """The signal arrives in the 2nd of 5 sampling calls at step 2: the run stops before the 3rd, saves step
    2 and reports it preempted (before, the evaluation or grid ran to its end and the run stopped a step later)."""
    c = tiny_config(num_steps=6)
    c.mesh.num_devices = 1
    c.eval.batch_size = 4
    if during == "evaluation":
        c.eval.every_steps, c.eval.num_samples, c.eval.respacing = 2, 20, "ddim2"
        calls = _sigterm_on_call(train_eval.make_sampler, train_eval, "make_sampler", monkeypatch)
    else:
        c.sample.every_steps, c.sample.classes, c.sample.per_class, c.sample.respacing = 2, (0, 1, 2, 3, 4), 4, "ddim2"
        calls = _sigterm_on_call(train.make_sampler, train, "make_sampler", monkeypatch)
    out = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert out.preempted == 2 and len(calls) == 2, (out.preempted, len(calls))
    assert sorted(int(n) for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()) == [2]
    assert not any(k.startswith("eval/") for k in out.metrics.get(2, {}))
