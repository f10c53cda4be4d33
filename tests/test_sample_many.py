"""dit-jax-sample-many on the 8 simulated CPU devices of conftest: PNGs, the .npz, resuming, determinism."""
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from test_sample_cli import tiny_torch_dit

from dit_jax import sample_many


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_torch_dit(seed=3).state_dict(), path)
    return str(path)


def run(ckpt, out_dir, *extra):
    return sample_many.main(["--ckpt", ckpt, "--vae", "none", "--num-sampling-steps", "3", "--num-images", "10",
                             "--per-device-batch-size", "1", "--cfg-scale", "2.0", "--seed", "7", "--no-progress",
                             "--out-dir", str(out_dir), *extra])


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
    assert run(ckpt, out) == f"{out}.npz"
    assert pngs(out) == [f"{i:06d}.png" for i in range(10)]
    for f, mtime in first.items():  # finished images were not redone
        if f != "000003.png":
            assert os.stat(out / f).st_mtime_ns == mtime, f
    np.testing.assert_array_equal(np.load(f"{out}.npz")["arr_0"], np.load(full_run[1])["arr_0"])


def test_same_images_on_fewer_devices(ckpt, full_run, tmp_path):
    out = tmp_path / "two"
    run(ckpt, out, "--num-local-devices", "2", "--per-device-batch-size", "1")
    np.testing.assert_array_equal(np.load(f"{out}.npz")["arr_0"], np.load(full_run[1])["arr_0"])


def test_rerun_with_other_settings_is_refused(ckpt, full_run):
    out, _ = full_run
    with pytest.raises(SystemExit, match=r"other settings \(seed: 7 -> 8\)"):
        sample_many.main(["--ckpt", ckpt, "--vae", "none", "--num-sampling-steps", "3", "--num-images", "10",
                          "--per-device-batch-size", "1", "--cfg-scale", "2.0", "--seed", "8", "--no-progress",
                          "--out-dir", str(out)])


def test_balanced_labels():
    np.testing.assert_array_equal(sample_many.image_labels(0, [0, 1, 11, 25], 10, "balanced"), [0, 1, 1, 5])
    a = sample_many.image_labels(0, range(20), 10, "random")
    b = sample_many.image_labels(0, range(10, 20), 10, "random")
    np.testing.assert_array_equal(a[10:], b)
    assert a.min() >= 0 and a.max() < 10 and len(set(a.tolist())) > 3


@pytest.mark.slow
def test_subprocess_killed_with_sigkill_then_resumed(ckpt, full_run, tmp_path):
    """A real kill: SIGKILL as soon as the first PNG exists, then the same command again.

    One device and one image per batch: 9 more batches are left when the first PNG appears, so the kill lands
    mid-run (the images equal the 8-device run's, see test_same_images_on_fewer_devices)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dit_jax.sample_many", "--ckpt", ckpt, "--vae", "none", "--num-sampling-steps", "3",
           "--num-images", "10", "--per-device-batch-size", "1", "--cfg-scale", "2.0", "--seed", "7",
           "--no-progress", "--num-local-devices", "1", "--out-dir", str(out)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (out.exists() and pngs(out)):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert not os.path.exists(f"{out}.npz"), "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL and 0 < len(pngs(out)) < 10
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    np.testing.assert_array_equal(np.load(f"{out}.npz")["arr_0"], np.load(full_run[1])["arr_0"])
