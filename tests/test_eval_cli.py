"""dit-jax-eval as a user runs it (the installed script, random Inception weights converted to the project's
.npz): ADM's five lines, --json, --save-stats from a batch and from a folder through the training crop, a
statistics-only REF, and one-line errors that leave nothing behind."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dit_jax.evaluation.batches import load_stats
from dit_jax.evaluation.inception import init_params
from dit_jax.evaluation.weights import save_params

BIN = os.path.dirname(sys.executable)
SIZE = 32


def run(*args, env=None):
    e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([os.path.join(BIN, "dit-jax-eval"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=e, timeout=900)


def npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    weights = save_params(init_params(0), str(d / "inception.npz"))
    r = np.random.default_rng(0)
    # 4 images a side: the fewest precision/recall accept (k=3 neighbours + itself); Inception on a CPU is slow
    ref = npz(d / "ref.npz", arr_0=r.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8))
    folder = d / "samples"
    for c in range(2):  # class sub-folders, so the same folder also works as a training data folder
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(r.integers(0, 256, (SIZE + 8, SIZE, 3), dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    return d, weights, ref, folder


@pytest.mark.slow
def test_five_lines_json_and_statistics(files):
    d, weights, ref, folder = files
    r = run(ref, npz(d / "s.npz", arr_0=np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), np.uint8)),
            "--inception", weights, "--json", d / "scores.json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert [l.split(":")[0] for l in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    scores = json.loads((d / "scores.json").read_text())
    assert all(np.isfinite(scores[k]) for k in ("inception_score", "fid", "sfid", "precision", "recall"))
    assert scores["fid"] > 0 and scores["num_sample_images"] == 4

    # --save-stats from the batch, then a statistics-only REF: FID and sFID equal, the rest not available.
    assert run(ref, "--save-stats", d / "ref_stats.npz", "--inception", weights).returncode == 0
    st = load_stats(str(d / "ref_stats.npz"))
    assert st.mu.dtype == np.float64 and st.sigma.shape == (2048, 2048) and st.sigma_s.shape == (2023, 2023)
    r2 = run(d / "ref_stats.npz", d / "s.npz", "--inception", weights)
    assert r2.returncode == 0, r2.stderr[-3000:]
    got = dict(l.split(": ") for l in r2.stdout.strip().splitlines())
    assert abs(float(got["FID"]) - scores["fid"]) <= 1e-6 * scores["fid"]
    assert got["Precision"] == "not available" and got["Recall"] == "not available"


@pytest.mark.slow
def test_save_stats_of_a_folder_through_the_training_crop(files):
    d, weights, ref, folder = files
    r = run("--folder", folder, "--image-size", SIZE, "--save-stats", d / "crop_stats.npz", "--inception", weights)
    assert r.returncode == 0, r.stderr[-3000:]
    # The same 40x32 images centre-cropped to 32x32 (dit_jax.data, the release's crop) as an ADM batch.
    from dit_jax.data import image_reader

    reader = image_reader({"name": "folder", "folder": str(folder), "image_size": SIZE})
    crops = np.stack([reader.read(i)["pixels"] for i in range(len(reader))])
    assert run(npz(d / "crops.npz", arr_0=crops), "--save-stats", d / "crops_stats.npz",
               "--inception", weights).returncode == 0
    a, b = load_stats(str(d / "crop_stats.npz")), load_stats(str(d / "crops_stats.npz"))
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", ["no_arr_0", "one_batch", "missing_weights", "float_images"])
def test_one_line_errors(files, tmp_path, case):
    d, weights, ref, folder = files
    if case == "no_arr_0":
        args, needle = (ref, npz(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8)), "--inception",
                        weights), "arr_0"
    elif case == "one_batch":
        args, needle = (ref, "--inception", weights), "expected REF and SAMPLES"
    elif case == "float_images":
        args, needle = (ref, npz(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32)), "--inception",
                        weights), "uint8"
    else:
        args, needle = (ref, ref, "--cache-dir", tmp_path / "cache"), "pt_inception-2015-12-05"
    r = run(*args, "--json", tmp_path / "out.json",
            env={"DIT_JAX_INCEPTION_URL": "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth"})
    errors = [l for l in r.stderr.splitlines() if ": error: " in l]
    assert r.returncode == 1 and len(errors) == 1 and needle in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out.json").exists()
