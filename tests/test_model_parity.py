"""Parity: dit_jax.model.DiT vs the PyTorch reference convert/reference/torch_dit.py, both directions.

torch -> flax: the release model with random weights converted by `convert.torch_to_flax`; flax -> torch: random
Flax params exported by `convert.flax_to_torch` and loaded into the reference with strict=True. Weights are
issue 19's: every trained parameter from N(0, 0.05) (the release zeroes adaLN and the output layer, which would
make the comparison trivial). dit_jax runs as its own programs compile it (dit_jax.utils.xla_cpu).

Metric: rel_err = max|jax - torch| / max|torch| (conftest.rel_err) per example, one t per example, float32 on
CPU. Tolerance 1e-5 everywhere, full depth included; t spans 0-999 (the release's float32 timestep features
are part of the model, so large t must agree as well as small t). Run with `-s` to see the errors.

Cost: each model's JAX forward is one program (`forward`); tests of the same small model share it through
module-scoped fixtures. The full-depth models are built without the release's own initialisation (every value
it draws is replaced by N(0, 0.05) anyway: `full_depth_release_model`), their Flax params are drawn in place;
the full-depth XL/2 (~675M parameters) checks every t of T_VALUES in both directions, and its PyTorch and JAX
forwards at batch 5 are most of this module's time. PyTorch runs on one thread (conftest.one_thread_references).
"""
import json

import jax
import numpy as np
import pytest
import torch

import convert
from benchmarks.precision import release_model
from conftest import nchw, nhwc, perturbed_torch_dit, rel_err, slow_except
from dit_t_values import depth2_t
from convert.reference.torch_dit import DiT_models as TORCH_MODELS
from convert.reference.torch_dit import TimestepEmbedder as TorchTimestepEmbedder
from dit_jax.model import DiT, abstract_params
from dit_jax.nn.model_ops import timestep_embedding
from dit_jax.utils import xla_cpu

TOL = 1e-5
FEATURE_TOL = 2e-7  # absolute, timestep features against the release's function
ALL_SIZES = sorted(TORCH_MODELS)  # the 12 names, "DiT-B/2" ... "DiT-XL/8"
T_VALUES = (0, 3, 500, 977, 999)  # one example each (the 2-block sizes at 256 px: dit_t_values.depth2_t)

pytestmark = pytest.mark.usefixtures("one_thread_references")


def inputs(model: torch.nn.Module, batch: int, input_size: int, num_classes: int = 1000, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, input_size, input_size, generator=g)  # (N, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def inputs_at_t(model: torch.nn.Module, input_size: int, ts=T_VALUES):
    x, _, y = inputs(model, len(ts), input_size)
    return x, torch.tensor(ts, dtype=torch.float32), y


_FORWARDS = {}


def forward(cfg: dict):
    """The jitted DiT(**cfg) forward as dit_jax compiles it: one program per config, shared by the tests."""
    key = json.dumps(cfg, sort_keys=True)
    if key not in _FORWARDS:
        jm = DiT(**cfg)
        _FORWARDS[key] = xla_cpu.jit(lambda p, x, t, y: jm.apply({"params": p}, x, t, y))
    return _FORWARDS[key]


def flax_forward(tm, x, t, y, **cfg_overrides):
    params, cfg = convert.torch_to_flax(tm.state_dict())
    cfg = {**cfg, **cfg_overrides}
    return nchw(forward(cfg)(params, nhwc(x), t.numpy(), y.numpy())), DiT(**cfg), params


def check(label: str, jax_out: np.ndarray, torch_out: torch.Tensor, tol: float = TOL) -> float:
    err = rel_err(jax_out, torch_out.numpy())
    print(f"\nPARITY {label}: rel_err={err:.2e}")
    assert np.isfinite(err) and err <= tol, f"{label}: rel_err {err:.3g} > {tol}"
    return err


def check_per_t(label: str, jax_out: np.ndarray, torch_out: torch.Tensor, t: torch.Tensor) -> None:
    ref = torch_out.numpy()
    errs = np.array([rel_err(jax_out[i], ref[i]) for i in range(len(ref))])
    print(f"\nPARITY {label}: rel_err per t " + ", ".join(f"{int(ti)}: {e:.2e}" for ti, e in zip(t, errs)))
    bad = [f"t={int(t[i])}: {errs[i]:.3g}" for i in np.flatnonzero(~(errs <= TOL))]
    assert not bad, f"{label}: rel_err > {TOL} at " + ", ".join(bad)


def random_flax_params(cfg: dict, std: float = 0.05, seed: int = 2) -> dict:
    """Params of the Flax DiT(**cfg) (its own tree, from abstract_params), every leaf from N(0, std).
    float32 draws of NumPy's Generator: the full-depth XL/2's 675M values in ~2 s (RandomState's float64: ~14 s)."""
    rs = np.random.default_rng(seed)

    def leaf(s):
        a = rs.standard_normal(s.shape, dtype=np.float32)
        a *= np.float32(std)  # in place: no second copy of the full-depth XL/2's 2.7 GB
        return a

    return jax.tree_util.tree_map(leaf, abstract_params(DiT(**cfg)))


def full_depth_release_model(name: str, input_size: int, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """The release DiT `name` at its own depth, every trained parameter from N(0, std), like
    benchmarks.precision.release_model but built on the meta device: the release's initialisation (xavier draws
    for all ~675M values of XL/2, ~3.5 CPU-s) would be overwritten anyway. pos_embed is the release's table."""
    from convert.reference.torch_dit import _sincos_2d

    with torch.device("meta"):
        model = TORCH_MODELS[name](input_size=input_size)
    model = model.to_empty(device="cpu").eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key != "pos_embed":
                p.normal_(0.0, std)
        grid = input_size // model.patch_size
        model.pos_embed.copy_(torch.from_numpy(_sincos_2d(model.pos_embed.shape[-1], grid)).float()[None])
    return model


def check_both_directions(name: str, depth=2, input_size: int = 32, ts=T_VALUES):
    """torch -> flax on the release model, then flax -> torch into the same reference module (strict), both
    at every t of `ts` (inputs_at_t)."""
    tm = release_model(name, input_size, depth=depth) if depth else full_depth_release_model(name, input_size)
    x, t, y = inputs_at_t(tm, input_size, ts)
    with torch.no_grad():
        ref = tm(x, t, y)
    params, cfg = convert.torch_to_flax(tm.state_dict())
    assert cfg["depth"] == len(tm.blocks) and cfg["input_size"] == input_size
    label = f"{name} depth={cfg['depth']} latent={input_size}"
    fwd = forward(cfg)
    check_per_t(label + " torch->flax", nchw(fwd(params, nhwc(x), t.numpy(), y.numpy())), ref, t)
    del params, ref  # the full-depth XL/2 holds several GB per copy
    params = random_flax_params(cfg)
    tm.load_state_dict(convert.flax_to_torch(params, cfg), strict=True)
    with torch.no_grad():
        ref = tm(x, t, y)
    check_per_t(label + " flax->torch", nchw(fwd(params, nhwc(x), t.numpy(), y.numpy())), ref, t)


def test_timestep_features_equal_release_at_every_t():
    """The features are the release's function: within 2e-7 at every integer t in [0, 999] (measured 6.0e-8:
    the same float32 frequencies and products, only cos/sin differ) and at fractional t."""
    embed = jax.jit(lambda t: timestep_embedding(t, 256))
    for t in (np.arange(1000, dtype=np.float32), np.random.RandomState(0).uniform(0, 1000, 2000).astype(np.float32)):
        ours = np.asarray(embed(t), np.float64)  # (N, 256)
        ref = TorchTimestepEmbedder.timestep_embedding(torch.from_numpy(t), 256).double().numpy()
        err = np.abs(ours - ref).max()
        print(f"\nfeatures vs the release's function: max abs {err:.2e}")
        assert err <= FEATURE_TOL, f"timestep features {err:.3g} from the release's (t up to {t.max():.0f})"
    # Odd dims pad one zero column, like the release.
    t = np.arange(0, 1000, 37, dtype=np.float32)
    ref = TorchTimestepEmbedder.timestep_embedding(torch.from_numpy(t), 33).numpy()
    np.testing.assert_allclose(np.asarray(timestep_embedding(t, 33)), ref, rtol=0, atol=FEATURE_TOL)


# The L and XL sizes and B/2 take 4-8 CPU-s each (slow); these five stay in the quick loop.
QUICK_DEPTH2 = ("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/4", "DiT-B/8")


@pytest.mark.parametrize("name", slow_except(ALL_SIZES, QUICK_DEPTH2))
def test_parity_all_sizes_depth2(name):
    """Every size at 2 blocks, at the t values test_model_precision uses for it (one compiled program each)."""
    check_both_directions(name, ts=depth2_t(name))


def test_parity_s2_full_depth():
    check_both_directions("DiT-S/2", depth=None)


@pytest.mark.slow
def test_parity_xl2_full_depth():
    check_both_directions("DiT-XL/2", depth=None)


@pytest.fixture(scope="module")
def s2_small():
    """(torch model, flax params, cfg): DiT-S/2, 2 blocks, latent 16, perturbed release init (shared by the
    tests that only read it)."""
    tm = perturbed_torch_dit("DiT-S/2", depth=2, input_size=16)
    params, cfg = convert.torch_to_flax(tm.state_dict())
    return tm, params, cfg


@pytest.fixture(scope="module")
def s4_small():
    """The same for DiT-S/4."""
    tm = perturbed_torch_dit("DiT-S/4", depth=2, input_size=16)
    params, cfg = convert.torch_to_flax(tm.state_dict())
    return tm, params, cfg


def jitted(fn):
    """fn compiled as dit_jax compiles its programs (one compile instead of an op-by-op eager apply)."""
    return xla_cpu.jit(fn)


@pytest.mark.parametrize("guidance_channels", [3, None])
def test_parity_forward_with_cfg(s2_small, guidance_channels):
    tm, params, cfg = s2_small
    x, t, y = inputs(tm, 4, 16)
    y[2:] = 1000  # second half: the null class
    with torch.no_grad():
        ref = tm.forward_with_cfg(x, t, y, 4.0, guidance_channels=guidance_channels)
    jm = DiT(**cfg)
    out = jitted(lambda p, x, t, y: jm.apply({"params": p}, x, t, y, 4.0, guidance_channels,
                                             method=DiT.forward_with_cfg))(params, nhwc(x), t.numpy(), y.numpy())
    check(f"forward_with_cfg guidance_channels={guidance_channels}", nchw(out), ref)
    # The guided channels are identical in both halves; the release's 3-channel variant leaves eps channel 3
    # (and the variance channels) as the model computed them, so the halves differ there.
    out = np.asarray(out)
    nc = 4 if guidance_channels is None else guidance_channels
    np.testing.assert_array_equal(out[:2, ..., :nc], out[2:, ..., :nc])
    assert not np.allclose(out[:2, ..., nc:], out[2:, ..., nc:])


def test_parity_learn_sigma_false():
    tm = perturbed_torch_dit("DiT-B/4", depth=2, input_size=32, learn_sigma=False)
    x, t, y = inputs(tm, 2, 32)
    with torch.no_grad():
        ref = tm(x, t, y)
    assert ref.shape[1] == 4
    out, jm, _ = flax_forward(tm, x, t, y)
    assert jm.learn_sigma is False
    check("DiT-B/4 learn_sigma=False", out, ref)


@pytest.mark.parametrize("name", slow_except(["DiT-S/2", "DiT-XL/8"], quick=("DiT-S/2",)))
def test_parity_512px_latents(name):
    check_both_directions(name, input_size=64)


def test_parity_null_label_force_drop_ids(s4_small):
    tm, params, cfg = s4_small
    x, t, y = inputs(tm, 4, 16)
    drop = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        ref = tm(x, t, y, force_drop_ids=drop)
        ref_null = tm(x, t, torch.full_like(y, 1000))
    jm = DiT(**cfg)
    out = jitted(lambda p, x, t, y, d: jm.apply({"params": p}, x, t, y, force_drop_ids=d))(
        params, nhwc(x), t.numpy(), y.numpy(), drop.numpy())
    check("force_drop_ids [1,0,1,0]", nchw(out), ref)
    # Dropped rows equal the explicit null label 1000.
    np.testing.assert_allclose(nchw(out)[[0, 2]], ref_null.numpy()[[0, 2]], rtol=0, atol=1e-5)


def test_train_label_dropout_needs_rng(s4_small):
    tm, params, cfg = s4_small
    x, t, y = inputs(tm, 3, 16)
    with pytest.raises(Exception, match="dropout"):
        DiT(**cfg).apply({"params": params}, nhwc(x), t.numpy(), y.numpy(), train=True)
    # With dropout probability 1 every label is dropped, which must equal the reference's forced null label.
    jm = DiT(**{**cfg, "class_dropout_prob": 1.0})
    out = jitted(lambda p, x, t, y, k: jm.apply({"params": p}, x, t, y, train=True, rngs={"dropout": k}))(
        params, nhwc(x), t.numpy(), y.numpy(), jax.random.PRNGKey(0))
    with torch.no_grad():
        ref = tm(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.long))
    check("train=True, class_dropout_prob=1 vs forced null", nchw(out), ref)
    # train=False never drops, even without an rng.
    out_eval = jitted(lambda p, x, t, y: DiT(**cfg).apply({"params": p}, x, t, y, train=False))(
        params, nhwc(x), t.numpy(), y.numpy())
    with torch.no_grad():
        check("train=False", nchw(out_eval), tm(x, t, y))


def test_parity_check_can_fail(s2_small):
    """The metric detects a wrong conversion: transposing one square kernel breaks parity by far more than TOL."""
    tm, params, cfg = s2_small
    x, t, y = inputs(tm, 2, 16)
    with torch.no_grad():
        ref = tm(x, t, y).numpy()
    bad = jax.tree_util.tree_map(lambda a: a, params)  # new containers: the fixture's params stay intact
    k = params["blocks"]["attn"]["proj"]["kernel"]  # (depth, D, D): block 1's kernel is k[1]
    bad["blocks"]["attn"]["proj"]["kernel"] = np.stack([k[0], k[1].T])
    out = forward(cfg)(bad, nhwc(x), t.numpy(), y.numpy())
    assert rel_err(nchw(out), ref) > 1e-3
    # And a timestep embedding with diffusers' frequency shift differs measurably from the release.
    out = forward({**cfg, "timestep_freq_shift": 1.0})(params, nhwc(x), t.numpy(), y.numpy())
    assert rel_err(nchw(out), ref) > 10 * TOL
