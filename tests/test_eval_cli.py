"""dit-jax-eval as a user runs it (the installed script, random Inception weights converted to the project's
.npz): ADM's five lines, --json, --save-stats from a batch and from a folder through the training crop, a
statistics-only REF, and one-line errors that leave nothing behind (the command's main in this process: each
start of the script costs ~2 CPU seconds, and these stop before any compute)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cheap_commands
from dit_jax.cli import eval as eval_cli
from dit_jax.evaluation.batches import load_stats
from dit_jax.evaluation.inception import init_params
from dit_jax.evaluation.weights import save_params

BIN = os.path.dirname(sys.executable)
SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def cheap():
    """One BLAS thread in the commands (a Fréchet distance of 2048-d statistics: 2.2 CPU seconds instead of
    7) and every compiled program cached (tests/cheap_commands.py)."""
    with cheap_commands.settings():
        yield


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
        for i in range(2):  # 4 images, as many as ref.npz: Inception's program (4 rows) compiles once
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
    assert got["Precision"].startswith("not available (needs images on both sides; REF ")
    assert got["Recall"] == got["Precision"]


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


RANK = 16


def random_stats(seed):
    """FID statistics of the right shapes: random means, covariances A A^T / RANK of rank RANK (like 17 images),
    with the factors A kept for an independent Fréchet distance."""
    r = np.random.default_rng(seed)
    stats, factors = {}, {}
    for key, dim in (("", 2048), ("_s", 2023)):
        factors[key] = r.standard_normal((dim, RANK))  # (D, RANK)
        stats["mu" + key], stats["sigma" + key] = r.standard_normal(dim), factors[key] @ factors[key].T / RANK
    return stats, factors


def low_rank_frechet(s1, f1, s2, f2, key):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), with S = A A^T / k: the eigenvalues of S1 S2 are
    those of (A1^T A2)(A2^T A1) / k^2, so the last trace is the sum of the singular values of A1^T A2 / k."""
    a1, a2 = f1[key], f2[key]
    cross = np.linalg.svd(a1.T @ a2 / RANK, compute_uv=False).sum()
    return (np.sum((s1["mu" + key] - s2["mu" + key]) ** 2) + np.sum(a1 ** 2) / RANK + np.sum(a2 ** 2) / RANK
            - 2 * cross)


@pytest.mark.slow  # ~20 s of CPU: two Fréchet distances of 2048-d statistics
def test_two_statistics_files_need_no_network(tmp_path):
    """FID and sFID of two statistics-only files, offline, with an empty cache: the Inception weights are
    never loaded (any download would fail: the URL points at a closed port), the other metrics say why not."""
    (a, fa), (b, fb) = random_stats(1), random_stats(2)
    ref, samples = npz(tmp_path / "ref_stats.npz", **a), npz(tmp_path / "sample_stats.npz", **b)
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    offline = {"DIT_JAX_CACHE": str(cache), "HF_HOME": str(cache), "XDG_CACHE_HOME": str(cache),
               "TORCH_HOME": str(cache), "HOME": str(cache), "HF_HUB_OFFLINE": "1",
               "DIT_JAX_INCEPTION_URL": "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth"}
    r = run(ref, samples, "--json", tmp_path / "scores.json", env=offline)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(l.split(": ", 1) for l in r.stdout.strip().splitlines())
    want_fid, want_sfid = (low_rank_frechet(a, fa, b, fb, key) for key in ("", "_s"))
    assert want_fid > 1000 and abs(float(got["FID"]) - want_fid) <= 1e-9 * want_fid, (got["FID"], want_fid)
    assert abs(float(got["sFID"]) - want_sfid) <= 1e-9 * want_sfid, (got["sFID"], want_sfid)
    for label in ("Inception Score", "Precision", "Recall"):
        assert got[label].startswith("not available (") and "statistics but no arr_0 images" in got[label], got[label]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["precision"] is None and "sample_stats.npz has statistics but no arr_0" in scores["not_available"]["inception_score"]
    assert list(cache.iterdir()) == []  # nothing downloaded or cached


@pytest.mark.parametrize("case", ["no_arr_0", "one_batch", "missing_weights", "float_images"])
def test_one_line_errors(files, tmp_path, case, capsys, monkeypatch):
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
    monkeypatch.setenv("DIT_JAX_INCEPTION_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    capsys.readouterr()
    rc = eval_cli.main([*map(str, args), "--json", str(tmp_path / "out.json"), "--no-progress"])
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if ": error: " in l]
    assert rc == 1 and len(errors) == 1 and needle in errors[0], err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "out.json").exists()
