"""evaluate() / compute_stats() on ADM .npz batches and image folders.

- Features of the real network (random weights) split over the 8 simulated devices (chunks padded) equal
  one-device features: relative error <= 1e-5.
- The plumbing tests use a stand-in extractor (a fixed random projection of the pixels, same outputs and
  sizes) because the Inception network at 299 px costs about a second per image on this CPU.
- evaluate() passes the right statistics to the Fréchet distance (recorded: a 2048-d eigendecomposition takes
  ~30 s on this shared CPU, and its maths is tested in test_metrics.py) and equals IS and precision/recall
  computed by hand from the same features.
- Saved statistics: means and covariances against np.mean / np.cov on the same activations, rel. <= 1e-12.
- A side with statistics only gives FID and sFID; the rest is "not available".
- Bad inputs: one EvalInputError each, naming the problem, raised before the network runs, nothing written.
"""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dit_jax.evaluation import metrics as M
from dit_jax.evaluation.batches import EvalInputError, Stats, load_stats, open_batch, save_stats
from dit_jax.evaluation.evaluate import compute_stats, evaluate, format_results
from dit_jax.evaluation.features import FeatureExtractor
from dit_jax.evaluation.inception import init_params
from conftest import rel_err

pytestmark = pytest.mark.timeout(600)
SIZE = 32


@pytest.fixture(scope="module")
def params():
    return init_params(0)


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def _folder(path, images):
    os.makedirs(path, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(path, f"{i:03d}.png"))
    return str(path)


class Projection:
    """Stand-in for FeatureExtractor: pool/spatial/logits from fixed random projections of the pixels."""

    def __init__(self):
        g = np.random.default_rng(0)
        d = SIZE * SIZE * 3
        self.w = {"pool": g.normal(size=(d, 2048)) / d, "spatial": g.normal(size=(d, 2023)) / d,
                  "logits_unbiased": g.normal(size=(d, 1008)) / np.sqrt(d)}
        self.calls = 0

    def extract(self, source, progress=True, desc=""):
        self.calls += 1
        x = np.concatenate([source.read(i, i + 4) for i in range(0, len(source), 4)]).reshape(len(source), -1)
        x = x.astype(np.float64) / 255.0
        return {k: (np.maximum(x @ w, 0) if k == "pool" else x @ w).astype(np.float32) for k, w in self.w.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dit_jax.evaluation.features import ArraySource

    root = tmp_path_factory.mktemp("eval")
    ref, samples = _images(9, 1), _images(6, 2)
    ext = Projection()
    return {"ref": ref, "samples": samples, "ref_npz": _npz(root / "ref.npz", arr_0=ref),
            "samples_dir": _folder(root / "samples", samples), "ext": ext,
            "ref_feats": ext.extract(ArraySource(ref)), "samples_feats": ext.extract(ArraySource(samples))}


@pytest.fixture
def fd_calls(monkeypatch):
    """Replaces the Fréchet distance inside evaluate() with a recorder returning a cheap number."""
    calls = []

    def record(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((mu1 - mu2) ** 2) + np.sum(np.abs(sigma1 - sigma2)))

    monkeypatch.setattr("dit_jax.evaluation.evaluate.M.frechet_distance", record)
    return calls


def _same_stats(call, sample_feats, ref_feats):
    (m1, s1), (m2, s2) = M.statistics(sample_feats), M.statistics(ref_feats)
    return all(rel_err(a, b) <= 1e-12 for a, b in zip(call, (m1, s1, m2, s2)))


@pytest.mark.slow
def test_devices_split_matches_one_device(params):
    assert jax.device_count() == 8
    images = _images(3, 1)
    split = FeatureExtractor(params, per_device_batch=1).extract(images, progress=False)  # 8 devices, 5 padded
    one = FeatureExtractor(params, per_device_batch=3, devices=jax.devices()[:1])(images)
    for k in ("pool", "spatial", "logits_unbiased"):
        assert split[k].shape[0] == 3
        assert rel_err(split[k], one[k]) <= 1e-5, k
    # One full chunk of 16 (2 per device) and a short last one of 2, padded to 8 rows (one per device), not 16.
    # The one-device side runs the 3-row program above six times (no other compile).
    many = _images(18, 2)
    got = FeatureExtractor(params, per_device_batch=2).extract(many, progress=False)
    want = FeatureExtractor(params, per_device_batch=3, devices=jax.devices()[:1])(many)
    assert got["pool"].shape[0] == 18 and rel_err(got["pool"], want["pool"]) <= 1e-5


def test_evaluate_npz_against_folder(data, fd_calls):
    res = evaluate(data["ref_npz"], data["samples_dir"], None, extractor=data["ext"], progress=False)
    r, s = data["ref_feats"], data["samples_feats"]
    assert len(fd_calls) == 2 and res["fid"] is not None and res["sfid"] is not None
    assert _same_stats(fd_calls[0], s["pool"], r["pool"]) and _same_stats(fd_calls[1], s["spatial"], r["spatial"])
    assert res["inception_score"] == pytest.approx(M.inception_score(s["logits_unbiased"]), rel=1e-9)
    assert (res["precision"], res["recall"]) == M.precision_recall(r["pool"], s["pool"])
    assert res["num_ref_images"] == 9 and res["num_sample_images"] == 6
    lines = format_results(res).splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]


def test_saved_statistics_match_numpy_and_stand_in_for_images(data, tmp_path, fd_calls):
    stats = compute_stats(data["ref_npz"], None, extractor=data["ext"], progress=False)
    acts = data["ref_feats"]
    for name, key in (("mu", "pool"), ("mu_s", "spatial")):
        assert rel_err(getattr(stats, name), np.mean(acts[key].astype(np.float64), axis=0)) <= 1e-12
    for name, key in (("sigma", "pool"), ("sigma_s", "spatial")):
        assert rel_err(getattr(stats, name), np.cov(acts[key], rowvar=False)) <= 1e-12
    path = save_stats(str(tmp_path / "ref_stats.npz"), stats)
    with np.load(path) as f:
        assert sorted(f.files) == ["mu", "mu_s", "sigma", "sigma_s"] and f["sigma"].dtype == np.float64
    res = evaluate(path, data["samples_dir"], None, extractor=data["ext"], progress=False)
    full = evaluate(data["ref_npz"], data["samples_dir"], None, extractor=data["ext"], progress=False)
    assert res["fid"] == pytest.approx(full["fid"], rel=1e-9) and res["sfid"] == pytest.approx(full["sfid"], rel=1e-9)
    assert res["inception_score"] == pytest.approx(full["inception_score"], rel=1e-9)
    assert res["precision"] is None and res["recall"] is None
    assert "Precision: not available" in format_results(res)
    # ADM's reference batches carry both: the stored statistics win for FID, arr_0 is used for the rest
    both = _npz(tmp_path / "both.npz", arr_0=data["ref"], mu=stats.mu, mu_s=stats.mu_s, sigma=stats.sigma * 2,
                sigma_s=stats.sigma_s)
    del fd_calls[:]
    mixed = evaluate(both, data["samples_dir"], None, extractor=data["ext"], progress=False)
    assert np.array_equal(fd_calls[0][3], stats.sigma * 2) and mixed["precision"] == full["precision"]


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("arrays,match", [
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "no arr_0 .keys: images"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "dtype float32; expected uint8"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, r"arr_0 holds grayscale images of shape \(4, 8, 8\)"),
    ({"arr_0": np.zeros((4, 8, 8, 1), np.uint8)}, r"arr_0 holds grayscale images of shape \(4, 8, 8, 1\)"),
    ({"arr_0": np.zeros((4, 8, 8, 4), np.uint8)}, r"shape \(4, 8, 8, 4\); expected \(N, H, W, 3\)"),
    ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "no images"),
    ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, "not mu_s, sigma_s"),
    ({"mu": np.zeros(10), "sigma": np.eye(10), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}, "mu has shape"),
], ids=["no-arr_0", "float32", "grayscale-3d", "grayscale-1ch", "rgba", "empty", "partial-stats", "stats-shape"])
def test_bad_npz(tmp_path, arrays, match):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EvalInputError, match=match) as e:
        open_batch(path)
    assert "bad.npz" in str(e.value) and "\n" not in str(e.value)


def test_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"hello")
    with pytest.raises(EvalInputError, match="not an .npz"):
        open_batch(str(tmp_path / "x.npz"))
    with pytest.raises(EvalInputError, match="no such file"):
        open_batch(str(tmp_path / "missing.npz"))


def test_bad_folders(tmp_path):
    good = _images(2, 0)
    d = _folder(tmp_path / "unreadable", good)
    (tmp_path / "unreadable" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvalInputError, match="broken.png: unreadable image"):
        open_batch(d).images.read(0, 3)
    d = _folder(tmp_path / "gray", good)
    Image.fromarray(good[0, :, :, 0]).save(tmp_path / "gray" / "zz.png")
    with pytest.raises(EvalInputError, match="zz.png: grayscale image"):
        open_batch(d).images.read(0, 3)
    d = _folder(tmp_path / "sizes", good)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "sizes" / "zz.png")
    with pytest.raises(EvalInputError, match="zz.png: size 16x16, but .*000.png is 32x32"):
        open_batch(d).images.read(0, 3)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(EvalInputError, match="no image files"):
        open_batch(str(tmp_path / "empty"))


def test_too_few_images_named_before_any_compute(tmp_path):
    ref = _npz(tmp_path / "ref.npz", arr_0=_images(3, 0))
    samples = _npz(tmp_path / "samples.npz", arr_0=_images(5, 1))
    # `inception` is never touched: the check comes first
    with pytest.raises(EvalInputError, match=r"ref.npz: 3 image\(s\); Precision needs at least 4 images"):
        evaluate(ref, samples, inception=None)
    one = _npz(tmp_path / "one.npz", arr_0=_images(1, 0))
    with pytest.raises(EvalInputError, match=r"one.npz: 1 image\(s\); FID needs at least 2"):
        evaluate(samples, one, inception=None)
    with pytest.raises(EvalInputError, match="statistics need at least 2"):
        compute_stats(one, inception=None)


def test_save_stats_writes_nothing_on_bad_input(tmp_path):
    out = tmp_path / "s.npz"
    with pytest.raises(EvalInputError, match="sigma has shape"):
        save_stats(str(out), Stats(np.zeros(2048), np.eye(3), np.zeros(2023), np.eye(2023)))
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(EvalInputError, match="no statistics"):
        load_stats(_npz(tmp_path / "imgs.npz", arr_0=_images(2, 0)))
