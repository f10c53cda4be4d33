"""Sample quality during training (config.eval): the digits scorer, the curve in metrics.jsonl and TensorBoard,
and the Inception kind end to end on a tiny latent model (random Inception weights, a tiny VAE)."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from conftest import tiny_config
from configs.default import get_config
from dit_jax import train
from dit_jax.evaluation import digits as digits_eval
from dit_jax.evaluation.batches import Stats, save_stats
from dit_jax.evaluation.inception import init_params as inception_init
from dit_jax.utils.errors import ConfigError
from dit_jax.vae import AutoencoderKL


def test_digits_scorer_separates_real_digits_from_noise():
    s = digits_eval.scorer()
    assert s.heldout_accuracy > 0.9
    d = load_digits()
    real = (d.images / 8.0 - 1.0)[..., None]  # (N, 8, 8, 1) in [-1, 1]
    half = s.score(real[::2], d.target[::2])
    noise = s.score(np.random.default_rng(0).uniform(-1, 1, real[::2].shape), d.target[::2])
    assert half["digits_fd"] < 0.05 * noise["digits_fd"], (half, noise)  # a real half is close, noise is far
    assert half["digits_class_acc"] > 0.9 and noise["digits_class_acc"] < 0.5
    shuffled = s.score(real[::2], np.roll(d.target[::2], 1))  # right images, wrong conditioning labels
    assert shuffled["digits_class_acc"] < 0.3


def test_digits_curve_in_metrics_and_tensorboard(tmp_path):
    c = tiny_config(num_steps=4, tensorboard=True)
    c.mesh.num_devices = 1
    c.eval.update(every_steps=2, num_samples=20, respacing="ddim5", batch_size=20)
    out = train.train_and_evaluate(c, str(tmp_path))
    assert {"eval/digits_fd", "eval/digits_class_acc"} <= set(out.metrics[2]) and "eval/digits_fd" in out.metrics[4]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "eval/digits_fd" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval/digits_fd"]) for r in evals)
    events = b"".join(open(f, "rb").read() for f in glob.glob(os.path.join(tmp_path, "tb", "events.*")))
    assert b"eval/digits_fd" in events and b"eval/digits_class_acc" in events


def test_eval_config_checked_before_compute(tmp_path):
    c = tiny_config()
    c.eval.update(every_steps=2, kind="inception", reference_stats=str(tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match="reference_stats=.*missing.npz.*no such file.*--save-stats"):
        train.setup(c)
    c.eval.kind = "fid50k"
    with pytest.raises(ConfigError, match="config.eval.kind='fid50k'"):
        train.setup(c)
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_inception_kind_on_a_tiny_latent_model(tmp_path):
    """FID/sFID/IS of VAE-decoded samples against stored statistics, and the FID equals the formula on the
    features of the same samples."""
    c = get_config("S/2")
    c.num_steps, c.global_batch_size, c.log_every_steps = 1, 4, 1
    c.mesh.num_devices = 1
    c.model.update(input_size=4, num_classes=3, depth=1, hidden_size=32, num_heads=2)
    c.data.update(name="latents")
    c.checkpoint.update(every_steps=0, async_save=False)
    c.sample.every_steps, c.tensorboard = 0, False
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)  # 4x4 latents -> 8x8
    vae_params = jax.jit(vae.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]  # one compile
    r = np.random.default_rng(0)
    stats = Stats(r.standard_normal(2048), np.eye(2048), r.standard_normal(2023), np.eye(2023))
    save_stats(str(tmp_path / "ref.npz"), stats)
    c.eval.update(every_steps=1, kind="inception", num_samples=4, batch_size=4, respacing="ddim2",
                  reference_stats=str(tmp_path / "ref.npz"))
    env = train.setup(c)
    from dit_jax.training.sample_quality import Evaluator
    from dit_jax.training.state import init_state

    ev = Evaluator(c, env.model, env.mesh, lambda name: (vae, vae_params), lambda path: inception_init(0))
    state = init_state(env.model, env.tx, jax.random.PRNGKey(0), env.state_shardings)
    scores = ev(state.ema_params)
    assert set(scores) == {"eval/fid", "eval/sfid", "eval/inception_score", "eval/seconds"}
    # The same number by hand from the evaluator's own samples and the extractor.
    x0 = ev.samples(state.ema_params)
    from dit_jax.utils.images import to_uint8
    from dit_jax.vae import decode_latents

    images = np.asarray(to_uint8(decode_latents(vae, vae_params, jnp.asarray(x0))))
    feats = np.asarray(ev.extractor.extract(images, progress=False)["pool"], np.float64)  # (4, 2048)
    # FID = |mu - mu_r|^2 + tr S + tr S_r - 2 tr((S S_r)^(1/2)), here with S_r = I: tr(S^(1/2)) is the sum of the
    # square roots of S's eigenvalues, and the 4 samples' covariance S = Xc^T Xc / 3 has the nonzero eigenvalues
    # of the 4 x 4 Gram matrix Xc Xc^T / 3. An exact formula independent of metrics.frechet_distance, without
    # its two 2048 x 2048 eigendecompositions.
    mu = feats.mean(axis=0)
    xc = feats - mu
    gram_eigenvalues = np.clip(np.linalg.eigvalsh(xc @ xc.T / (len(feats) - 1)), 0.0, None)
    assert np.array_equal(stats.sigma, np.eye(2048))
    want = float((mu - stats.mu) @ (mu - stats.mu) + gram_eigenvalues.sum() + 2048.0
                 - 2.0 * np.sqrt(gram_eigenvalues).sum())
    assert abs(scores["eval/fid"] - want) <= 1e-6 * abs(want)
