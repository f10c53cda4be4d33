"""dit_jax.diffusion (float32 JAX) against the float64 NumPy reference in reference_diffusion_np.py.

Tolerance: <= 1e-5 relative (max |a - b| / max |b|) for every quantity, including whole sampling loops.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from reference_diffusion_np import RefDiffusion, ref_betas, ref_kept_timesteps

from dit_jax.diffusion import GaussianDiffusion, create_diffusion, step_noise
from dit_jax.diffusion_schedules import get_named_beta_schedule, space_timesteps

TOL = 1e-5
N, H, W, C = 3, 4, 4, 2

_r = np.random.default_rng(123)
W_MEAN = _r.normal(size=(C, C)) * 0.4
W_VAR = _r.normal(size=(C, C)) * 0.5


MU = np.array([0.3, -0.2])  # per-channel data mean
S2 = 0.25  # data variance
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # the model's own idea of the noise level


# The same model in float64 NumPy and float32 JAX. Its mean output is the ideal denoiser for data
# N(MU, S2) at the ORIGINAL timestep t (E[eps | x_t] or E[x_0 | x_t]) plus a small fixed nonlinear map, so it
# behaves like a trained model (sampling loops stay well conditioned) and a wrong timestep changes it.
# Its variance output (learned sigma) is a tanh of another fixed map and of t.
def _denoiser(xp, x, t, abar, wm, wv, mean, learned):
    a = abar[t][:, None, None, None]
    centered = x - xp.sqrt(a) * MU
    denom = a * S2 + 1 - a
    pert = 0.05 * xp.tanh(x @ wm)
    if mean == "epsilon":
        out = xp.sqrt(1 - a) * centered / denom + pert
    else:
        out = MU + xp.sqrt(a) * S2 * centered / denom + pert
    if not learned:
        return out
    return xp.concatenate([out, xp.tanh(0.5 * x @ wv + xp.cos(t[:, None, None, None] / 80.0))], axis=-1)


def np_model(learned, mean="epsilon"):
    return lambda x, t: _denoiser(np, x, np.asarray(t), ABAR, W_MEAN, W_VAR, mean, learned)


def jax_model(learned, mean="epsilon"):
    abar = jnp.asarray(ABAR, jnp.float32)
    wm, wv = jnp.asarray(W_MEAN, jnp.float32), jnp.asarray(W_VAR, jnp.float32)
    return lambda x, t: _denoiser(jnp, x, t, abar, wm, wv, mean, learned).astype(jnp.float32)


def f32(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def make(spec="", schedule="linear", mean="epsilon", var="learned_range", loss="mse"):
    """The same diffusion in both implementations."""
    ref = RefDiffusion(schedule, spec, mean, var, loss)
    d = create_diffusion(spec, noise_schedule=schedule, predict_xstart=mean == "x0",
                         learn_sigma=var == "learned_range", sigma_small=var == "fixed_small")
    d.loss_type = loss  # create_diffusion only reaches mse / rescaled_mse / rescaled_kl
    return ref, d


CONFIGS = [  # (spec, schedule, mean, var)
    ("", "linear", "epsilon", "learned_range"),
    ("250", "linear", "epsilon", "learned_range"),
    ("ddim25", "linear", "epsilon", "learned_range"),
    ("10,10,10", "linear", "epsilon", "fixed_small"),
    ("ddim25", "linear", "epsilon", "fixed_large"),
    ("10,10,10", "linear", "x0", "learned_range"),
    ("ddim25", "squaredcos_cap_v2", "epsilon", "learned_range"),
    ("250", "squaredcos_cap_v2", "x0", "fixed_small"),
]


# ----------------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,steps", [("linear", 1000), ("linear", 250), ("squaredcos_cap_v2", 1000)])
def test_betas(name, steps):
    b = get_named_beta_schedule(name, steps)
    assert b.dtype == np.float64 and b.shape == (steps,)
    np.testing.assert_allclose(b, ref_betas(name, steps), rtol=1e-14)
    if name == "linear":
        assert b[0] == pytest.approx(1e-4 * 1000 / steps) and b[-1] == pytest.approx(0.02 * 1000 / steps)
    else:
        assert b.max() <= 0.999


def _kept_or_error(fn, steps, spec):
    try:
        return sorted(fn(steps, spec))
    except ValueError:
        return "ValueError"


def _multi_section_specs():
    """Fixed and random comma-separated strings, counts 0..size per section (a 0 keeps nothing there)."""
    specs = ["10,10,10", "50,30,20", "334,333,333", "1,1,1", "21,43,7", "0,10", "3,0,3", "100,0,0,5"]
    r = np.random.default_rng(14)
    for _ in range(300):
        n = int(r.integers(2, 9))
        sizes = [1000 // n + (i < 1000 % n) for i in range(n)]
        specs.append(",".join(str(int(r.integers(0, size + 1))) for size in sizes))
    return specs


@pytest.mark.parametrize("steps", [1000, 250, 37])
def test_space_timesteps_every_count_matches_release(steps):
    """Every single-section count K and every "ddimK" against the release's loop (reference_diffusion_np)."""
    wrong = [k for k in range(1, steps + 1)
             if sorted(space_timesteps(steps, str(k))) != ref_kept_timesteps(steps, str(k))]
    assert wrong == [], f"{len(wrong)} of {steps} counts keep different timesteps, e.g. {wrong[:10]}"
    ddim = [f"ddim{k}" for k in range(1, steps + 1)]
    wrong = [s for s in ddim
             if _kept_or_error(space_timesteps, steps, s) != _kept_or_error(ref_kept_timesteps, steps, s)]
    assert wrong == [], f"ddimK differs for K in {wrong[:10]}"


def test_space_timesteps_multi_section_matches_release():
    specs = _multi_section_specs()
    wrong = [s for s in specs
             if _kept_or_error(space_timesteps, 1000, s) != _kept_or_error(ref_kept_timesteps, 1000, s)]
    assert wrong == [], f"{len(wrong)} of {len(specs)} strings differ, e.g. {wrong[:5]}"


def test_space_timesteps_known_values():
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))
    s = sorted(space_timesteps(1000, "10,10,10"))  # sections of 334, 333, 333 steps
    assert len(s) == 30 and s[:3] == [0, 37, 74] and s[9] == 333 and s[10] == 334 and s[-1] == 999
    s = sorted(space_timesteps(1000, "250"))
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999
    # The release sums the fractional stride step by step: 499, not round(10 * 49.95) = 500.
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    assert {499, 833} <= space_timesteps(1000, "43")
    assert space_timesteps(1000, "0,2") == {500, 999}  # a count of 0 keeps nothing from its section
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim333")
    with pytest.raises(ValueError, match="section 0"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="keeps no timesteps"):
        space_timesteps(10, "0,0")


def test_respaced_chain_keeps_alpha_bar():
    full = create_diffusion("")
    d = create_diffusion("ddim25")
    assert d.num_timesteps == 25 and full.num_timesteps == 1000
    np.testing.assert_allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map], rtol=1e-12)


def test_factory_arguments():
    assert create_diffusion(None).num_timesteps == 1000
    assert create_diffusion("").loss_type == "mse"
    assert create_diffusion("", use_kl=True).loss_type == "rescaled_kl"
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == "rescaled_mse"
    assert create_diffusion("", learn_sigma=False).model_var_type == "fixed_large"
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == "fixed_small"
    assert create_diffusion("", predict_xstart=True).model_mean_type == "x0"
    assert create_diffusion("100", diffusion_steps=500).original_num_steps == 500
    with pytest.raises(ValueError, match="noise_schedule"):
        create_diffusion("", noise_schedule="cosine")


def test_model_sees_original_timesteps():
    d = create_diffusion("10,10,10")
    seen = []

    def spy(x, t):
        seen.append(np.asarray(t))
        return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))

    x = jnp.zeros((3, H, W, C))
    d.p_mean_variance(spy, x, jnp.array([0, 9, 29]))
    np.testing.assert_array_equal(seen[-1], [0, 333, 999])
    d.training_losses(spy, x, jnp.array([10, 11, 12]), noise=x)
    np.testing.assert_array_equal(seen[-1], [334, 371, 408])
    steps = []

    def recorder(x, t):  # inside the compiled loop: report t to the host
        jax.debug.callback(lambda v: steps.append(int(v[0])), t)
        return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))

    jax.block_until_ready(d.ddim_sample_loop(recorder, x.shape, noise=x))
    assert steps == sorted(d.timestep_map.tolist(), reverse=True)


def test_model_output_shape_error():
    d = create_diffusion("ddim25")
    with pytest.raises(ValueError, match=r"expected \(3, 4, 4, 4\)"):
        d.p_mean_variance(lambda x, t: x, jnp.zeros((3, H, W, C)), jnp.zeros(3, jnp.int32))


# ----------------------------------------------------------------------------------------------------
# Single-step quantities
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,schedule", [("", "linear"), ("10,10,10", "linear"), ("ddim25", "squaredcos_cap_v2")])
def test_q_sample_and_posterior(spec, schedule):
    ref, d = make(spec, schedule)
    x0, noise, xt = f32((N, H, W, C), 1), f32((N, H, W, C), 2), f32((N, H, W, C), 3)
    t = np.array([0, 1, d.num_timesteps - 1])
    assert rel_err(d.q_sample(x0, t, noise), ref.q_sample(x0, t, noise)) <= TOL
    got = d.q_posterior_mean_variance(x0, xt, t)
    want = ref.posterior(x0.astype(np.float64), xt.astype(np.float64), t)
    for g, w, name in zip(got, want, ("mean", "variance", "log_variance")):
        assert rel_err(np.broadcast_to(g, w.shape), w) <= TOL, name


@pytest.mark.parametrize("spec,schedule,mean,var", CONFIGS)
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance(spec, schedule, mean, var, clip):
    ref, d = make(spec, schedule, mean, var)
    learned = var == "learned_range"
    x = f32((N, H, W, C), 4)
    t = np.array([0, d.num_timesteps // 2, d.num_timesteps - 1])
    got = d.p_mean_variance(jax_model(learned, mean), x, t, clip_denoised=clip)
    want = ref.p_mean_variance(np_model(learned, mean), x.astype(np.float64), t, clip=clip)
    for k in ("mean", "variance", "log_variance", "pred_xstart"):
        # Clipped x_0 keeps, at t = T-1, the float32 cancellation error of (x_t - sqrt(1-abar) eps) / sqrt(abar)
        # (about ulp(|x_t|) * 158 = 3e-5 absolute) while its scale drops to 1, hence 1e-4 there.
        tol = 1e-4 if clip and k in ("pred_xstart", "mean") else TOL
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))


LOSS_CASES = [  # (spec, mean, var, loss)
    ("", "epsilon", "learned_range", "mse"),
    ("", "epsilon", "learned_range", "rescaled_mse"),
    ("250", "epsilon", "learned_range", "rescaled_mse"),
    ("", "x0", "learned_range", "mse"),
    ("", "epsilon", "fixed_small", "mse"),
    ("", "epsilon", "fixed_large", "kl"),
    ("", "epsilon", "learned_range", "kl"),
    ("ddim25", "epsilon", "learned_range", "rescaled_kl"),
    ("10,10,10", "x0", "fixed_small", "rescaled_kl"),
]


@pytest.mark.parametrize("spec,mean,var,loss", LOSS_CASES)
def test_training_losses(spec, mean, var, loss):
    ref, d = make(spec, "linear", mean, var, loss)
    learned = var == "learned_range"
    n = 6
    # Data in [-1, 1] with some values at the ends so the decoder NLL's edge branches are used (t == 0).
    x0 = np.clip(f32((n, H, W, C), 5), -1, 1)
    noise = f32((n, H, W, C), 6)
    t = np.array([0, 0, 1, d.num_timesteps // 3, d.num_timesteps - 2, d.num_timesteps - 1])
    got = jax.jit(lambda a, b, c: d.training_losses(jax_model(learned, mean), a, b, noise=c))(x0, t, noise)
    want = ref.training_losses(np_model(learned, mean), x0.astype(np.float64), t, noise.astype(np.float64))
    assert set(got) == {"loss", "mse", "vb"}
    for k in ("loss", "mse", "vb"):
        assert got[k].shape == (n,)
        if np.any(want[k] != 0):
            assert rel_err(got[k], want[k]) <= TOL, (k, rel_err(got[k], want[k]))
        else:
            assert np.all(np.asarray(got[k]) == 0), k
    np.testing.assert_allclose(got["loss"], got["mse"] + got["vb"], rtol=1e-6)


def test_vb_term_uses_stop_gradient_mean():
    d = create_diffusion("")
    x0, noise = f32((N, H, W, C), 7), f32((N, H, W, C), 8)
    t = jnp.array([0, 500, 999])

    def vb_and_mse(wm, wv):
        def f(x, tt):
            tt = tt.astype(jnp.float32)[:, None, None, None]
            return jnp.concatenate([x @ wm + 0.1 * tt / 1000, jnp.tanh(x @ wv)], -1)
        out = d.training_losses(f, x0, t, noise=noise)
        return out["vb"].sum(), out["mse"].sum()

    wm, wv = jnp.asarray(W_MEAN, jnp.float32), jnp.asarray(W_VAR, jnp.float32)
    g_vb, g_mse = jax.jit(lambda a, b: (jax.grad(lambda a, b: vb_and_mse(a, b)[0], argnums=(0, 1))(a, b),
                                         jax.grad(lambda a, b: vb_and_mse(a, b)[1], argnums=(0, 1))(a, b)))(wm, wv)
    assert np.all(np.asarray(g_vb[0]) == 0) and np.abs(g_vb[1]).max() > 0   # vb trains only the variance
    assert np.abs(g_mse[0]).max() > 0 and np.all(np.asarray(g_mse[1]) == 0)  # mse trains only the mean


# ----------------------------------------------------------------------------------------------------
# Whole loops
# ----------------------------------------------------------------------------------------------------
LOOP_CONFIGS = [c for c in CONFIGS if c[0] != ""]  # the 1000-step chain is covered by the single-step tests


@pytest.mark.parametrize("spec,schedule,mean,var", LOOP_CONFIGS)
def test_ddim_loop_eta0(spec, schedule, mean, var):
    ref, d = make(spec, schedule, mean, var)
    learned = var == "learned_range"
    x_T = f32((N, H, W, C), 9)
    got = jax.jit(lambda z: d.ddim_sample_loop(jax_model(learned, mean), z.shape, noise=z, eta=0.0))(x_T)
    want = ref.ddim_loop(np_model(learned, mean), x_T.astype(np.float64))
    assert rel_err(got, want) <= TOL, rel_err(got, want)


def _noises(rng, d, shape):
    """The noise each loop step uses, computed independently of the loop: {step k: (N, H, W, C)}."""
    all_steps = np.asarray(jax.jit(jax.vmap(lambda k: step_noise(rng, k, shape)))(jnp.arange(d.num_timesteps)))
    return {k: all_steps[k].astype(np.float64) for k in range(d.num_timesteps)}


@pytest.mark.parametrize("spec,schedule,mean,var", LOOP_CONFIGS)
def test_ddpm_loop(spec, schedule, mean, var):
    ref, d = make(spec, schedule, mean, var)
    learned = var == "learned_range"
    x_T, rng = f32((N, H, W, C), 10), jax.random.PRNGKey(3)
    got = jax.jit(lambda z, k: d.p_sample_loop(jax_model(learned, mean), z.shape, k, noise=z))(x_T, rng)
    want = ref.ddpm_loop(np_model(learned, mean), x_T.astype(np.float64), _noises(rng, d, x_T.shape))
    assert rel_err(got, want) <= TOL, rel_err(got, want)


def test_ddim_loop_eta_and_clip():
    ref, d = make("ddim25")
    x_T, rng = f32((N, H, W, C), 11), jax.random.PRNGKey(4)
    got = d.ddim_sample_loop(jax_model(True), x_T.shape, rng, noise=x_T, eta=0.7, clip_denoised=True)
    want = ref.ddim_loop(np_model(True), x_T.astype(np.float64), eta=0.7, noises=_noises(rng, d, x_T.shape),
                         clip=True)
    assert rel_err(got, want) <= TOL, rel_err(got, want)


def test_per_example_keys_do_not_depend_on_the_batch():
    d = create_diffusion("5")
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4))
    shape = (4, H, W, C)
    loop = jax.jit(lambda k: d.p_sample_loop(jax_model(True), (k.shape[0], H, W, C), k))
    full, part = loop(keys), loop(keys[2:])
    np.testing.assert_allclose(full[2:], part, rtol=1e-6, atol=1e-6)
    assert rel_err(full[:2], full[2:]) > 0.1  # different keys, different samples
    with pytest.raises(ValueError, match="per-example keys"):
        d.p_sample_loop(jax_model(True), shape, keys[:3])


def test_progress_bar_runs(capsys):
    d = create_diffusion("ddim5")
    x_T = f32((N, H, W, C), 12)
    plain = jax.jit(lambda z: d.ddim_sample_loop(jax_model(True), z.shape, noise=z))(x_T)
    with_bar = jax.jit(lambda z: d.ddim_sample_loop(jax_model(True), z.shape, noise=z, progress=True))(x_T)
    jax.block_until_ready(with_bar)
    np.testing.assert_allclose(plain, with_bar, rtol=1e-6, atol=1e-6)
    assert "5/5" in capsys.readouterr().err


def test_gaussian_diffusion_validates_arguments():
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion(np.full(10, 0.01), model_var_type="fixed")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.zeros(10))
    with pytest.raises(ValueError, match="noise=x_T or rng"):
        create_diffusion("ddim5").ddim_sample_loop(jax_model(True), (1, H, W, C))
    assert math.isclose(float(create_diffusion("").alphas_cumprod[-1]), 4.0358e-5, rel_tol=1e-3)
