"""Every installed console script under bad input and faults: the exit code, a message of one line naming the
problem, what is (not) left on disk; and success exits 0.

Where the process itself is the subject (exit 0 after writing the output, Ctrl-C) the script runs as a user runs
it (`run`: a subprocess of the script in the environment's bin/). Errors and workdir faults go through the same
script's main(argv) in this process (`call`, tests/cli_inprocess.py: the same exit code and stderr, without
~1.5 CPU-s of imports per case). Other real processes: test_config_flag (dit-jax-train trains;
dit-jax-extract-latents' error exit), test_convert_cli and test_sample_cli (the python -m entry points).

Exit codes (docs): 0 success, 1 an error in the input/data/files/config (one line), 2 a usage error, 130 Ctrl-C.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli_inprocess import run_main as call
from conftest import TINY_FLAGS, perturbed_torch_dit

BIN = os.path.dirname(sys.executable)
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")
# conftest's tiny model (the training programs of other modules' runs, so the compilation cache hits)
TINY = [*TINY_FLAGS, "--config.checkpoint.async_save=False"]
ONE = ["--config.mesh.num_devices=1"]  # training runs: one of the 8 devices of the test process
SAMPLE = ["--vae", "none", "--num-sampling-steps", "2", "--no-progress", "--class-labels", "1", "2"]


def run(script, *args, env=None, timeout=300, one_device=True):
    """The installed script in a subprocess: on one simulated device, or (one_device=False) on the 8 of this
    process, where a program on one of them is the one this process and the other tests compile (the
    compilation cache's key includes the process's device count)."""
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    if one_device:
        e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    e.update(env or {})
    return subprocess.run([os.path.join(BIN, script), *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=timeout)


def error_lines(r):
    """The error lines of stderr ("PROG: error: ..."); progress lines before them are not errors."""
    return [l for l in r.stderr.strip().splitlines() if ": error: " in l]


def assert_fails(r, needle, code=1):
    lines = error_lines(r)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and r.stderr.strip().splitlines()[-1] == lines[0], r.stderr[-3000:]  # one line, last
    assert needle in lines[0], (needle, lines)
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(perturbed_torch_dit("DiT-S/2", depth=2, input_size=8, num_classes=10).state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# Success exits 0 (dit-jax-sample and -sample-many used to exit 1 after writing their output)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_and_sample_many_exit_0(converted, tmp_path):
    # The tiny checkpoint converted to a dit_jax directory (as the processes read it: no torch import, ~1.4 s).
    # dit-jax-sample on 8 devices (one used): the sampling program of test_sample_cli's shared runs.
    ckpt = converted[1]
    r = run("dit-jax-sample", "--ckpt", ckpt, *SAMPLE, "--out", tmp_path / "g.png", one_device=False)
    assert r.returncode == 0 and (tmp_path / "g.png").exists(), r.stderr[-2000:]
    assert r.stdout == ""  # nothing printed but progress on stderr (no stray return value)
    r = run("dit-jax-sample-many", "--ckpt", ckpt, "--vae", "none", "--num-sampling-steps", "2", "--no-progress",
            "--num-images", "2", "--per-device-batch-size", "2", "--out-dir", tmp_path / "many")
    assert r.returncode == 0 and (tmp_path / "many.npz").exists(), r.stderr[-2000:]


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    """`dit-jax-convert to-flax` of the tiny checkpoint: the result, and the directory."""
    out = tmp_path_factory.mktemp("converted") / "flax"
    return call("dit-jax-convert", "to-flax", ckpt, out), out


def test_convert_exits_0_and_1(converted, tmp_path):
    assert converted[0].returncode == 0, converted[0].stderr[-2000:]
    assert_fails(call("dit-jax-convert", "to-flax", tmp_path / "nope.pt", tmp_path / "o"), "nope.pt: no such file")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------
# Values checked before any work: one line, exit 1, nothing written
# ----------------------------------------------------------------------------------------------------
SAMPLE_CASES = [
    (["--eta", "-5"], "--eta=-5.0: must be between 0.0 and 1.0"),
    (["--nrow", "0"], "--nrow=0: must be >= 1"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps=0: must be between 1 and 1000"),
    (["--cfg-scale", "0.5"], "--cfg-scale=0.5: must be >= 1.0"),
    (["--batch-size", "0"], "--batch-size=0: must be >= 1"),
    (["--seed", "-1"], "--seed=-1: must be between 0"),
    (["--respacing", "ddim7x"], "--respacing 'ddim7x'"),
    (["--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
]


@pytest.mark.parametrize("flags,needle", SAMPLE_CASES, ids=[c[0][0] for c in SAMPLE_CASES])
def test_sample_bad_values(ckpt, tmp_path, flags, needle):
    assert_fails(call("dit-jax-sample", "--ckpt", ckpt, *SAMPLE, *flags, "--out", tmp_path / "g.png"), needle)
    assert os.listdir(tmp_path) == []


def test_sample_bad_outputs_fail_before_sampling(ckpt, tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert_fails(call("dit-jax-sample", "--ckpt", ckpt, *SAMPLE, "--out", tmp_path / "dir.png"), "is a directory")
    (tmp_path / "file").write_text("x")
    assert_fails(call("dit-jax-sample", "--ckpt", ckpt, *SAMPLE, "--out", tmp_path / "file" / "g.png"),
                 "is a file, not a folder")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert_fails(call("dit-jax-sample", "--ckpt", ckpt, *SAMPLE, "--out", ro / "g.png"), "not writable")


def test_sample_bad_files(ckpt, tmp_path):
    data = open(ckpt, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_fails(call("dit-jax-sample", "--ckpt", tmp_path / "cut.pt", *SAMPLE, "--out", tmp_path / "g.png"),
                 "cut.pt: truncated or corrupt")
    assert_fails(call("dit-jax-sample", "--ckpt", tmp_path / "missing.pt", *SAMPLE, "--out", tmp_path / "g.png"),
                 "missing.pt: no such file")
    assert not (tmp_path / "g.png").exists()


def test_sample_offline_download_is_one_line(tmp_path, monkeypatch):
    """No --ckpt and no network: one line that says what to fetch and where, no false 'partial file' claim."""
    monkeypatch.setenv("DIT_JAX_BASE_URL", "http://127.0.0.1:9/DiT/models")  # port 9 (discard): connection refused
    r = call("dit-jax-sample", *SAMPLE, "--cache-dir", tmp_path, "--out", tmp_path / "g.png")
    assert_fails(r, "--ckpt PATH")
    assert "partial file" not in r.stderr and "DiT-XL-2-256x256.pt" in r.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--num-images", "0"], "--num-images=0: must be >= 1"),
    (["--per-device-batch-size", "-1"], "--per-device-batch-size=-1: must be >= 1"),
    (["--num-local-devices", "9"], "--num-local-devices=9: must be between 1 and 8 (this host has 8)"),  # 8 here
])
def test_sample_many_bad_values(ckpt, tmp_path, flags, needle):
    assert_fails(call("dit-jax-sample-many", "--ckpt", ckpt, "--vae", "none", "--no-progress", *flags,
                      "--out-dir", tmp_path / "s"), needle)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,needle", [
    (["--shard-size", "-1"], "--shard-size=-1: must be >= 1"),
    (["--batch-size", "0"], "--batch-size=0: must be >= 1"),
    (["--image-size", "4"], "--image-size=4: must be >= 8"),
])
def test_extract_latents_bad_values(tmp_path, flags, needle):
    assert_fails(call("dit-jax-extract-latents", "--folder", tmp_path, "--out", tmp_path / "lat", *flags), needle)
    assert not (tmp_path / "lat").exists()


def test_extract_latents_missing_folder(tmp_path):
    assert_fails(call("dit-jax-extract-latents", "--folder", tmp_path / "nope", "--out", tmp_path / "lat",
                     "--vae", tmp_path), "does not exist")


TRAIN_CASES = [
    (["--config.num_steps=0"], "config.num_steps=0: must be >= 1", 1),
    (["--config.global_batch_size=0"], "config.global_batch_size=0: must be >= 1", 1),
    (["--config.model.num_classes=5"], "labels span 0..9 but config.model.num_classes=5", 1),
    (["--config.ema_decay=1.5"], "config.ema_decay=1.5: must be between 0.0 and 1.0", 1),
    (["--config.mesh.fsdp=3", *ONE], "does not fit 1 devices", 1),
    (["--config.model.hidden_size=33"], "hidden_size=33 is not divisible by num_heads=2", 1),
    (["--config.optim.lrr=1"], "unknown config field in --config.optim.lrr", 2),
    (["--config.num_steps=abc"], "flag --config.num_steps=abc: invalid literal for int()", 2),
]


@pytest.mark.parametrize("flags,needle,code", TRAIN_CASES, ids=[c[0][0] for c in TRAIN_CASES])
def test_train_bad_config(tmp_path, flags, needle, code):
    wd = tmp_path / "w"
    r = call("dit-jax-train", "--config", CONFIG, "--workdir", wd, *TINY, *flags)
    assert_fails(r, needle, code)
    assert not (wd / "checkpoints").exists() and not (wd / "config.txt").exists()


# ----------------------------------------------------------------------------------------------------
# Training workdirs: config drift, checksums, damaged and empty checkpoints, Ctrl-C
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits workdir with checkpoints at steps 1, 2 and 3."""
    wd = tmp_path_factory.mktemp("trained") / "w"
    r = call("dit-jax-train", "--config", CONFIG, "--workdir", wd, *TINY, *ONE, "--config.num_steps=3",
             "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=5")
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def _snapshot(wd):
    return {os.path.relpath(os.path.join(d, f), wd): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(wd) for f in files}


def test_resume_with_changed_model_is_refused_and_changes_nothing(trained):
    before = _snapshot(trained)
    r = call("dit-jax-train", "--config", CONFIG, "--workdir", trained, *TINY, "--config.num_steps=5",
             "--config.model.hidden_size=64", *ONE)
    assert_fails(r, "model.hidden_size: checkpoint 32, now 64")
    assert "Event loop is closed" not in r.stderr
    assert _snapshot(trained) == before  # config.txt, metrics, checkpoints untouched


def _flip_bytes(path, n=4096):
    data = bytearray(open(path, "rb").read())
    start = max(0, len(data) // 2 - n // 2)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def test_damaged_newest_checkpoint_is_set_aside_and_the_intact_one_used(trained, tmp_path):
    import shutil

    wd = tmp_path / "w"
    shutil.copytree(trained, wd)
    _flip_bytes(_largest_file(wd / "checkpoints" / "3" / "state"))
    os.makedirs(wd / "checkpoints" / "4")  # an empty numbered folder must not block resuming either
    r = call("dit-jax-train", "--config", CONFIG, "--workdir", wd, *TINY, "--config.num_steps=4",
             "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=5", *ONE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint step 2" in r.stderr and "is damaged" in r.stderr
    names = os.listdir(wd / "checkpoints")
    assert sum(n.startswith("damaged-3-") for n in names) == 1 and sum(n.startswith("damaged-4-") for n in names) == 1
    assert {"2", "3", "4"} <= set(names)  # steps 3 and 4 trained again from step 2


def test_converted_directory_with_flipped_bytes_is_refused(converted, tmp_path):
    import shutil

    assert converted[0].returncode == 0, converted[0].stderr[-2000:]
    shutil.copytree(converted[1], tmp_path / "flax")
    _flip_bytes(_largest_file(tmp_path / "flax" / "params"), n=64)
    r = call("dit-jax-convert", "to-torch", tmp_path / "flax", tmp_path / "back.pt")
    assert_fails(r, "flax/params")
    assert "damaged" in r.stderr or "cannot restore" in r.stderr
    assert not (tmp_path / "back.pt").exists()


def test_ctrl_c_exits_130_and_names_the_last_checkpoint(tmp_path):
    wd = tmp_path / "w"
    e = dict(os.environ, JAX_PLATFORMS="cpu")  # 8 devices, one used: the tiny program of the runs above
    p = subprocess.Popen([os.path.join(BIN, "dit-jax-train"), "--config", CONFIG, "--workdir", str(wd), *TINY, *ONE,
                          "--config.num_steps=100000", "--config.checkpoint.every_steps=2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and not (wd / "checkpoints" / "2").exists():
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read()[-3000:]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    last = [l for l in err.strip().splitlines() if l][-1]
    assert last.startswith("dit-jax-train: interrupted; the last checkpoint is step "), last
    assert "Traceback" not in err
    step = int(last.split("step ")[1].split()[0])
    assert os.path.isdir(wd / "checkpoints" / str(step)) and step >= 2
