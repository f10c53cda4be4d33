"""dit-jax-sample-many on the 8 simulated CPU devices of conftest: PNGs, the .npz, resuming, determinism."""
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturbed_torch_dit
from dit_jax.cli import sample_many
from dit_jax.sampling import image_labels

FLAGS = ["--vae", "none", "--num-sampling-steps", "3", "--num-images", "10", "--per-device-batch-size", "1",
         "--cfg-scale", "2.0", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(perturbed_torch_dit("DiT-S/2", seed=3, depth=2, input_size=8, num_classes=10).state_dict(), path)
    return str(path)


def run(ckpt, out_dir, *extra):
    """The command's work in this process; -> the .npz path (None when stopped early)."""
    return sample_many.sample_many(sample_many.parse_args(["--ckpt", ckpt, *FLAGS, "--out-dir", str(out_dir), *extra]))


def pngs(out_dir):
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))


def load(out_dir, n=10):
    return np.stack([np.asarray(Image.open(os.path.join(out_dir, f"{i:06d}.png"))) for i in range(n)])


@pytest.fixture(scope="module")
def full_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "samples"
    npz = run(ckpt, out)
    return out, npz


def test_writes_pngs_and_npz(full_run):
    assert jax.local_device_count() == 8
    out, npz = full_run
    assert pngs(out) == [f"{i:06d}.png" for i in range(10)]
    assert npz == f"{out}.npz" and os.path.exists(npz)
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 3)  # --vae none: 8x8 latent previews
    np.testing.assert_array_equal(arr, load(out))
    assert len({a.tobytes() for a in arr}) == 10  # every index got its own noise
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_killed_run_resumes_to_identical_images(ckpt, full_run, tmp_path):
    out = tmp_path / "samples"
    assert run(ckpt, out, "--stop-after-batches", "1") is None  # "killed" after the first batch of 8
    assert len(pngs(out)) == 8 and not os.path.exists(f"{out}.npz")
    first = {f: os.stat(out / f).st_mtime_ns for f in pngs(out)}
    os.remove(out / "000003.png")  # as if killed between two PNG writes
    (out / "000005.png").write_bytes(b"")  # a 0-byte file: not a finished image
    data = (out / "000006.png").read_bytes()
    (out / "000006.png").write_bytes(data[: len(data) // 2])  # cut off mid-write (another file system's rename)
    assert run(ckpt, out) == f"{out}.npz"
    assert pngs(out) == [f"{i:06d}.png" for i in range(10)]
    for f, mtime in first.items():  # finished images were not redone
        if f not in ("000003.png", "000005.png", "000006.png"):
            assert os.stat(out / f).st_mtime_ns == mtime, f
    np.testing.assert_array_equal(np.load(f"{out}.npz")["arr_0"], np.load(full_run[1])["arr_0"])


def test_same_images_on_fewer_devices(ckpt, full_run, tmp_path):
    out = tmp_path / "two"
    run(ckpt, out, "--num-local-devices", "2", "--per-device-batch-size", "1")
    np.testing.assert_array_equal(np.load(f"{out}.npz")["arr_0"], np.load(full_run[1])["arr_0"])


def test_rerun_with_other_settings_is_refused(ckpt, full_run, capsys):
    out, _ = full_run
    assert sample_many.main(["--ckpt", ckpt, *FLAGS, "--seed", "8", "--out-dir", str(out)]) == 1
    assert "other settings (seed: 7 -> 8)" in capsys.readouterr().err


def test_balanced_labels():
    np.testing.assert_array_equal(image_labels(0, [0, 1, 11, 25], 10, "balanced"), [0, 1, 1, 5])
    a = image_labels(0, range(20), 10, "random")
    b = image_labels(0, range(10, 20), 10, "random")
    np.testing.assert_array_equal(a[10:], b)
    assert a.min() >= 0 and a.max() < 10 and len(set(a.tolist())) > 3


@pytest.mark.slow
def test_subprocess_killed_with_sigkill_then_resumed(ckpt, full_run, tmp_path):
    """A real kill: SIGKILL as soon as the first PNG exists, then the same command again (its main(argv) here).
    The weights as a dit_jax directory: the process reads them without importing torch (~1.4 s)."""
    import signal
    import subprocess
    import sys
    import time

    from convert import load_any
    from dit_jax.pretrained import save_pretrained

    model, params = load_any(ckpt)
    ckpt = save_pretrained(params, model, str(tmp_path / "tiny-flax"))

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    for attempt in range(3):  # the kill races the run's end; a run that finished first is tried again
        out = tmp_path / f"killed{attempt}"
        cmd = [sys.executable, "-m", "dit_jax.cli.sample_many", "--ckpt", ckpt, *FLAGS, "--out-dir", str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not (out.exists() and pngs(out)):
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
            proc.stderr.close()
        if not os.path.exists(f"{out}.npz"):
            break
    assert proc.returncode == -signal.SIGKILL and 0 < len(pngs(out)) < 10
    assert sample_many.main(cmd[3:]) == 0
    np.testing.assert_array_equal(np.load(f"{out}.npz")["arr_0"], np.load(full_run[1])["arr_0"])
