"""Bad input fails with a clear error before any compute; NaN losses stop the run; TensorBoard files."""
import glob
import os

import numpy as np
import pytest

from cli_inprocess import run_main
from conftest import tfrecords, train_command, tiny_config
from dit_jax import sharding as shd
from dit_jax import train
from dit_jax.utils.errors import CheckpointError, ConfigError, NonFiniteLossError


def _no_compute(monkeypatch):
    """Any attempt to build the train step means validation came too late."""
    def boom(*a, **k):
        raise AssertionError("compute started before the bad input was reported")

    monkeypatch.setattr(train, "jit_train_step", boom)
    monkeypatch.setattr(train, "init_state", boom)


def test_unknown_model_name(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match=r"config.model.name: unknown model 'DiT-Q/2'.*DiT-B/2"):
        train.train_and_evaluate(tiny_config(**{"model.name": "DiT-Q/2"}), str(tmp_path))


def test_batch_not_divisible_by_data_devices(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match=r"micro-batch 12 .* not divisible by the 8 data-parallel devices"):
        train.train_and_evaluate(tiny_config(global_batch_size=12), str(tmp_path))


def test_mesh_does_not_fit(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp = -1, 3
    with pytest.raises(shd.MeshError, match=r"mesh data=-1, fsdp=3, tensor=auto does not fit 8 devices"):
        train.train_and_evaluate(c, str(tmp_path))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1  # (tensor auto would take the other 2 devices)
    with pytest.raises(shd.MeshError, match=r"needs 4 devices but 8 are in use"):
        train.train_and_evaluate(c, str(tmp_path))


def test_unknown_config_field_on_the_command_line(tmp_path):
    """The command's entry point, main(argv), in this process (tests/cli_inprocess.py gives absl, which parses
    flags once per process, a fresh parse; test_cli_faults starts the installed script for such errors)."""
    r = run_main("dit-jax-train", *train_command(tmp_path / "w", "--config.optim.lrr=0.5")[3:])
    assert r.returncode == 2
    assert "unknown config field in --config.optim.lrr" in r.stderr and 'Did you mean "lr"' in r.stderr
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_corrupt_checkpoint(tmp_path, monkeypatch):
    wd = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(num_steps=1, **{"mesh.num_devices": 1}), wd)
    for path in glob.glob(os.path.join(wd, "checkpoints", "1", "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and "metadata" not in os.path.basename(path):
            with open(path, "wb") as f:
                f.write(b"not a checkpoint")
    _no_compute(monkeypatch)
    with pytest.raises(CheckpointError, match=r"every checkpoint in .*/checkpoints is damaged \(newest: step 1: it "
                                              r"cannot be restored"):
        train.train_and_evaluate(tiny_config(num_steps=2, **{"mesh.num_devices": 1}), wd)
    assert [n for n in os.listdir(os.path.join(wd, "checkpoints")) if n.startswith("damaged-1-")]  # kept aside


@pytest.mark.parametrize("log_every,first_nan_step", [
    (1, 4),  # every step is logged: the guard checks each step's loss right away (step 4 is also a save step)
    (100, 3),  # step 3 is neither logged nor saved: its loss is checked one step behind, after step 4 is dispatched
])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, log_every, first_nan_step):
    real = train.make_source
    checked = []
    real_check = train.check_finite
    monkeypatch.setattr(train, "check_finite", lambda step, *a: (checked.append(step), real_check(step, *a)))

    class Poisoned:
        def __init__(self, src):
            self.src, self.num_examples = src, src.num_examples

        def batch(self, step):
            b = self.src.batch(step)
            if step + 1 >= first_nan_step:  # (steps count from 1, batches from 0) NaN pixels from here on
                b["x"] = np.full_like(b["x"], np.nan)
            return b

        def close(self):
            pass

    monkeypatch.setattr(train, "make_source", lambda c: Poisoned(real(c)))
    c = tiny_config(num_steps=8, log_every_steps=log_every)
    c.checkpoint.every_steps = 2
    c.mesh.num_devices = 1
    wd = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError,
                       match=rf"non-finite training loss at step {first_nan_step} .*last good checkpoint is step 2"):
        train.train_and_evaluate(c, wd)
    assert checked == list(range(1, first_nan_step + 1))  # every step's loss was checked, the bad one last
    steps = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
    assert steps == [2]


def test_tensorboard_events_and_sample_grid(tmp_path):
    from tensorboard.compat.proto import event_pb2

    c = tiny_config(num_steps=2, tensorboard=True)
    c.sample.every_steps = 2
    c.sample.per_class = 1
    c.sample.respacing = "ddim5"
    c.mesh.num_devices = 1
    wd = str(tmp_path / "tb")
    train.train_and_evaluate(c, wd)
    files = glob.glob(os.path.join(wd, "tb", "events.out.tfevents.*"))
    assert len(files) == 1
    events = [event_pb2.Event.FromString(r) for r in tfrecords(open(files[0], "rb").read())]
    assert events[0].file_version == "brain.Event:2"
    tags = {(e.step, v.tag) for e in events for v in e.summary.value}
    for tag in ("loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec"):
        assert (2, tag) in tags and (1, tag) in tags
    assert (2, "samples/ema") in tags
    from PIL import Image

    grid = Image.open(os.path.join(wd, "samples", "step_00000002.png"))
    assert grid.size[0] > 0 and grid.size[1] > grid.size[0] * 5  # 10 rows (classes) x 1 column
