"""End to end on a GCS emulator: `dit-jax-extract-latents` in 2 jax.distributed processes writes latents of a
folder (in the bucket) to the bucket; training reads them back from the bucket; a run resumed at step k reads
exactly the rows of step k (the reader's requests and bytes are counted: no skip loop)."""
import pickle
import sys

import jax
import numpy as np
import pytest

import cheap_commands
from conftest import env_without_xla_flags, run_processes, tiny_vae, write_folder
from dit_jax.data import latents as dl
from dit_jax.data import image_reader, make_source
from dit_jax.training.latent_extraction import extract
from dit_jax.train import train_and_evaluate
from dit_jax.utils import paths
from test_data_train import IMAGE, latent_config


@pytest.fixture(scope="module", autouse=True)
def cheap():
    """The commands' programs cached, process 1's too; one BLAS thread; less GC (tests/cheap_commands.py)."""
    with cheap_commands.settings():
        yield


def upload(local_root, url):
    for f in sorted(local_root.rglob("*")):
        if f.is_file():
            (paths.as_path(url) / f.relative_to(local_root).as_posix()).write_bytes(f.read_bytes())


@pytest.mark.slow
def test_extract_to_bucket_with_two_processes_then_train_and_resume(tmp_path, gcs_dir, monkeypatch):
    local = write_folder(tmp_path / "imgs" / "train", np.random.default_rng(1))  # 12 images, 3 classes
    folder, out = f"{gcs_dir}/imgs/train", f"{gcs_dir}/latents"
    upload(local, folder)
    vae, params = tiny_vae()
    with open(tmp_path / "vae.pkl", "wb") as f:
        pickle.dump((vae, jax.device_get(params)), f)
    cli_args = ["--folder", folder, "--image_size", str(IMAGE), "--vae", "tiny", "--batch_size", "4",
                "--shard_size", "4", "--out", out, "--no_progress"]

    def cmd(port, p):
        return [sys.executable, "-m", "tests.extract_multiprocess_worker", str(port), str(p), "2",
                str(tmp_path / "vae.pkl"), "--", *cli_args]

    for rc, log in run_processes(cmd, 2, timeout=240, env=env_without_xla_flags()):
        assert rc == 0, log[-3000:]
        assert "shards written, 0 already done (of 3)" in log
    assert dl.done_shards(out) == {0, 1, 2}
    # the same extraction in one local process: the bucket holds the same numbers
    ref = str(tmp_path / "ref")
    extract(image_reader({"name": "folder", "folder": str(local), "image_size": IMAGE}), ref, vae, params,
            batch_size=4, shard_size=4, progress=False, devices=jax.local_devices()[:1])
    bucket, disk = dl.LatentsReader(out), dl.LatentsReader(ref)
    idx, flips = np.arange(12), np.arange(12) % 2
    np.testing.assert_array_equal(bucket.labels, disk.labels)
    for key, value in bucket.read_rows(idx, flips).items():
        np.testing.assert_allclose(value, disk.read_rows(idx, flips)[key], rtol=0, atol=1e-6, err_msg=key)

    # training from the bucket: uninterrupted 4 steps, and 2 + 2 with a resume at step 2
    reads = []  # (indices, requests, bytes) of every read_rows call of the resumed run
    original = dl.LatentsReader.read_rows

    def counted(self, indices, flip):
        before = self.stats.snapshot()
        rows = original(self, indices, flip)
        after = self.stats.snapshot()
        reads.append((np.asarray(indices).tolist(), after["requests"] - before["requests"],
                      after["bytes"] - before["bytes"]))
        return rows

    def cfg(steps):
        c = latent_config(name="latents", latents_dir=out)
        c.num_steps, c.data.prefetch = steps, 0  # no read-ahead: every read is one the run asked for
        return c

    load = lambda name: (vae, params)  # noqa: E731
    full = train_and_evaluate(cfg(4), str(tmp_path / "full"), load_vae=load).losses
    train_and_evaluate(cfg(2), str(tmp_path / "resumed"), load_vae=load)
    monkeypatch.setattr(dl.LatentsReader, "read_rows", counted)
    resumed = train_and_evaluate(cfg(4), str(tmp_path / "resumed"), load_vae=load).losses
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):  # same rows, same flips, same rng: the same losses
        assert resumed[s] == pytest.approx(full[s], rel=1e-6), (s, resumed[s], full[s])
    order = make_source({"name": "latents", "latents_dir": out, "prefetch": 0}, global_batch_size=8, seed=3).order
    record = 2 * (IMAGE // 8) ** 2 * 4 * 4  # (mean, std) of one flip, float32
    assert [r[0] for r in reads] == [order.local_indices(2).tolist(), order.local_indices(3).tolist()]
    assert all(r[1:] == (8, 8 * record) for r in reads), reads  # one request per row: nothing skipped through
