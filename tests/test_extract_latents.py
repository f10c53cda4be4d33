"""dit-jax-extract-latents: equal to on-the-fly encoding, resumable after a kill, clear errors."""
import json
import os
import subprocess
import sys
import pickle
import textwrap

import jax
import numpy as np
import pytest

from conftest import tiny_vae, write_folder
from dit_jax.data import DataError, image_reader, make_source
from dit_jax.data import latents as data_latents
from dit_jax.data.preprocess import flip_mask
from dit_jax.training.latent_extraction import extract
from dit_jax.utils.images import to_model_range
from dit_jax.vae import AutoencoderKL

SIZE = 16  # images 16 px -> latents 2 x 2 x 4
def cfg(**kw):
    return {"image_size": SIZE, "num_workers": 2, "prefetch": 0, "random_flip": True, **kw}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("imgs") / "train", np.random.default_rng(1))  # 12 images
    out = str(tmp_path_factory.mktemp("lat") / "full")
    vae, params = tiny_vae()
    stats = extract(image_reader(cfg(name="folder", folder=str(root))), out, vae, params, batch_size=8,
                    shard_size=4, settings={"data": "test"}, progress=False)
    return root, out, vae, params, stats


def test_extracted_equals_on_the_fly(setup):
    root, out, vae, params, stats = setup
    assert stats == {"num_shards": 3, "written": 3, "already_done": 0, "skipped_images": 0}
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["num_examples"] == 12 and index["latent_shape"] == [2, 2, 4]
    encode = jax.jit(lambda x: vae.apply({"params": params}, x, method=AutoencoderKL.encode))
    lat = make_source(cfg(name="latents", latents_dir=out), global_batch_size=8, seed=11)
    img = make_source(cfg(name="folder", folder=str(root)), global_batch_size=8, seed=11)
    flips = []
    for step in range(3):  # same seed: same examples and the same flips in both sources
        a, b = lat.batch(step), img.batch(step)
        np.testing.assert_array_equal(a["y"], b["y"])
        assert b["image"].dtype == np.uint8  # scaled to [-1, 1] by the train step
        mean, logvar = encode(to_model_range(b["image"]))
        assert a["latent_mean"].shape == (8, 2, 2, 4) and a["latent_mean"].dtype == np.float32
        # tolerance 1e-5 absolute (values are O(1)); the batch composition differs, so not bitwise
        np.testing.assert_allclose(a["latent_mean"], mean, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a["latent_std"], np.exp(0.5 * np.asarray(logvar)), atol=1e-5, rtol=0)
        # the check can fail: a wrongly chosen mirror differs by far more than the tolerance
        mirror = encode(to_model_range(b["image"][:, :, ::-1]))[0]
        assert np.abs(np.asarray(mirror) - np.asarray(mean)).max(axis=(1, 2, 3)).min() > 1e-3
        flips.extend(flip_mask(11, step, 8))
    assert 0 < sum(flips) < len(flips)  # both plain and mirrored examples were compared
    lat.close()
    img.close()


KILL_SCRIPT = textwrap.dedent("""
    import os, pickle, signal, sys
    from dit_jax.data import image_reader
    from dit_jax.training.latent_extraction import extract
    with open(sys.argv[3], "rb") as f:
        vae, params = pickle.load(f)  # the test's tiny VAE
    reader = image_reader({{"name": "folder", "folder": sys.argv[1], "image_size": {size}}})
    def die(s):  # a real SIGKILL right after the second shard is in place: no cleanup runs
        if s == 1:
            os.makedirs(os.path.join(sys.argv[2], "shard-00002"))  # as if killed mid-shard: a part, no marker
            open(os.path.join(sys.argv[2], "shard-00002", "latents.npy"), "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
    extract(reader, sys.argv[2], vae, params, batch_size=8, shard_size=4, settings={{"data": "test"}},
            progress=False, on_shard=die)
""")


def test_killed_extraction_resumes(setup, tmp_path):
    root, full, vae, params, _ = setup
    out = str(tmp_path / "killed")
    with open(tmp_path / "vae.pkl", "wb") as f:
        pickle.dump((vae, jax.device_get(params)), f)
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(size=SIZE), str(root), out, str(tmp_path / "vae.pkl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["done", "index.json", "shard-00000", "shard-00001", "shard-00002"]
    assert sorted(os.listdir(os.path.join(out, "done"))) == ["shard-00000", "shard-00001"]
    with pytest.raises(DataError, match="incomplete: 1 of 3 shards missing"):  # the partial shard is not read
        data_latents.LatentsReader(out)
    before = {s: os.stat(os.path.join(out, s, "latents.npy")).st_mtime_ns for s in ("shard-00000", "shard-00001")}
    written = []
    stats = extract(image_reader(cfg(name="folder", folder=str(root))), out, vae, params, batch_size=8,
                    shard_size=4, settings={"data": "test"}, progress=False, on_shard=written.append)
    assert written == [2] and stats["already_done"] == 2
    assert sorted(os.listdir(os.path.join(out, "done"))) == ["shard-00000", "shard-00001", "shard-00002"]
    assert sorted(os.listdir(os.path.join(out, "shard-00002"))) == ["latents.npy", "y.npy"]  # no temporaries
    for s, t in before.items():  # finished shards untouched
        assert os.stat(os.path.join(out, s, "latents.npy")).st_mtime_ns == t
    for s in range(3):
        for k in ("latents", "y"):
            a = np.load(os.path.join(out, f"shard-{s:05d}", k + ".npy"))
            b = np.load(os.path.join(full, f"shard-{s:05d}", k + ".npy"))
            np.testing.assert_array_equal(a, b)


def test_two_processes_split_shards(setup, tmp_path):
    root, full, vae, params, _ = setup
    out = str(tmp_path / "two")
    reader = image_reader(cfg(name="folder", folder=str(root)))
    got = {}
    for p in range(2):
        w = []
        extract(reader, out, vae, params, batch_size=8, shard_size=4, process_index=p, process_count=2,
                settings={"data": "test"}, progress=False, on_shard=w.append)
        got[p] = w
    assert got == {0: [0, 2], 1: [1]}
    for s in range(3):
        np.testing.assert_array_equal(np.load(os.path.join(out, f"shard-{s:05d}", "latents.npy")),
                                      np.load(os.path.join(full, f"shard-{s:05d}", "latents.npy")))


def test_errors(setup, tmp_path):
    root, full, vae, params, _ = setup
    with pytest.raises(DataError, match="other settings.*shard_size"):  # resume with other settings
        extract(image_reader(cfg(name="folder", folder=str(root))), full, vae, params, batch_size=8,
                shard_size=5, settings={"data": "test"}, progress=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    json.dump({"format": data_latents.FORMAT, "num_examples": 12, "shard_size": 4, "num_shards": 3},
              open(partial / "index.json", "w"))
    with pytest.raises(DataError, match="incomplete: 3 of 3 shards missing.*rerun"):
        make_source(cfg(name="latents", latents_dir=str(partial)), global_batch_size=2)
    with pytest.raises(DataError, match="no index.json.*dit-jax-extract-latents"):
        make_source(cfg(name="latents", latents_dir=str(tmp_path)), global_batch_size=2)
    with pytest.raises(DataError, match="latents_dir is empty"):
        make_source(cfg(name="latents", latents_dir=""), global_batch_size=2)


def test_cli(setup, tmp_path, monkeypatch, capsys):
    from dit_jax.cli import extract_latents as cli
    root, full, vae, params, _ = setup
    a = cli.parse_args(["--folder", "/x", "--out", str(tmp_path), "--vae", "mse", "--batch-size", "16"])
    assert (a.folder, a.vae, a.batch_size, a.shard_size) == ("/x", "mse", 16, 1024)
    assert cli.main(["--folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no_progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(cli.vae_weights, "load_vae", lambda name, *a, **k: (vae, params))  # no download in tests
    args = ["--config", "configs/default.py", "--folder", str(root), "--image_size", str(SIZE), "--vae", "tiny",
            "--batch_size", "8", "--shard_size", "4", "--out", str(tmp_path / "cli"), "--no_progress"]
    assert cli.main(args) == 0
    assert "3 shards written, 0 already done (of 3)" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "0 shards written, 3 already done (of 3)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "cli" / "shard-00002" / "latents.npy"),
                                  np.load(os.path.join(full, "shard-00002", "latents.npy")))
