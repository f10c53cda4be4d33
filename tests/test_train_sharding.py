"""Sharded training on 8 simulated CPU devices: shardings, parity with one device, restore on other meshes."""
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import rel_err, tiny_config
from dit_jax import sharding as shd
from dit_jax.training import build
from dit_jax import train
from dit_jax.model import init_params
from dit_jax.training.state import TrainState
from dit_jax.training.step import make_loss_fn, make_train_step

TOL = 1e-5  # losses and norms: float32 sums in another order (sharded reductions) differ by ~1e-7 relative
# Parameters and EMA after 3 Adam steps: Adam divides each gradient by its own RMS, so an entry whose gradient
# is a sum of cancelling terms carries the reduction-order difference into the update almost undamped. Seen
# 1.06e-5 worst (one small tensor) on the CI machine, 6e-6 here; a gradient off by a constant factor on one
# shard or a missing all-reduce gives 1e-3 or more.
PARAM_TOL = 5e-5


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_param_specs_fsdp_and_tensor():
    cfg = tiny_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    env = train.setup(cfg)
    specs = shd.spec_tree(env.state_shardings.params)
    assert env.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    # qkv kernel (depth, 32, 96): the stacked depth axis is never sharded; heads -> tensor on the output
    # axis, fsdp on the only free axis left.
    assert specs["blocks/attn/qkv/kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks/attn/proj/kernel"] == P(None, "tensor", "fsdp")
    assert specs["blocks/mlp/fc1/kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks/mlp/fc2/kernel"] == P(None, "tensor", "fsdp")
    assert specs["blocks/adaLN_modulation_1/kernel"] == P(None, None, "fsdp")  # (32, 192): largest axis
    # 96 elements per block < fsdp_min_size: tensor only (the stacked array's size does not count)
    assert specs["blocks/attn/qkv/bias"] == P(None, "tensor")
    assert specs["final_layer/linear/bias"] == P()  # small: replicated
    # Adam moments follow their parameter; the step counters are replicated.
    o_specs = shd.spec_tree(env.state_shardings.opt_state)
    mu = [v for k, v in o_specs.items() if k.endswith("mu/blocks/attn/qkv/kernel")]
    assert mu == [P(None, "fsdp", "tensor")]
    assert all(v == P() for k, v in o_specs.items() if k.endswith("count"))


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    cfg1 = tiny_config()
    cfg1.mesh.num_devices = 1
    return train.train_and_evaluate(cfg1, str(tmp_path_factory.mktemp("one")))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """(data, fsdp, tensor) -> (result, workdir) of the tiny run on that 8-device mesh, trained once per module:
    the (2, 4, 1) run is also the one test_checkpoint_from_8_devices_restores_on_1_and_4 resumes (its
    checkpoint at the last step, 3)."""
    runs = {}

    def get(data, fsdp, tensor):
        if (data, fsdp, tensor) not in runs:
            cfg8 = tiny_config()
            cfg8.mesh.data, cfg8.mesh.fsdp, cfg8.mesh.tensor = data, fsdp, tensor
            workdir = str(tmp_path_factory.mktemp(f"mesh_{data}_{fsdp}_{tensor}"))
            runs[data, fsdp, tensor] = train.train_and_evaluate(cfg8, workdir), workdir
        return runs[data, fsdp, tensor]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp,tensor", [(2, 4, 1), (2, 2, 2)])
def test_sharded_run_matches_single_device(sharded_run, single_device_run, data, fsdp, tensor):
    """Losses, gradient norms (before clipping: digits clips at 1.0, and clipping plus Adam would hide a
    gradient off by a constant factor), parameters and EMA equal the single-device run's."""
    out8, out1 = sharded_run(data, fsdp, tensor)[0], single_device_run
    assert sorted(out8.losses) == [1, 2, 3]
    for s in (1, 2, 3):
        for k in ("loss", "grad_norm", "mse", "vb"):
            want = out1.metrics[s][k]
            assert abs(out8.metrics[s][k] - want) <= TOL * abs(want), (s, k, out8.metrics[s][k], want)
    p8, p1 = _flat(out8.state.params), _flat(out1.state.params)
    worst = max(rel_err(p8[k], p1[k]) for k in p1)
    assert worst < PARAM_TOL, worst
    e8, e1 = _flat(out8.state.ema_params), _flat(out1.state.ema_params)
    assert max(rel_err(e8[k], e1[k]) for k in e1) < PARAM_TOL
    o8, o1 = _flat(out8.state.opt_state), _flat(out1.state.opt_state)
    assert max(rel_err(o8[k], o1[k]) for k in o1 if np.abs(o1[k]).max() > 0) < 1e-4  # Adam's nu: squares
    # The parameters really are sharded over the mesh (fsdp, and tensor on the qkv output axis).
    qkv = out8.state.params["blocks"]["attn"]["qkv"]["kernel"]  # (depth, 32, 96)
    assert len({str(s.index) for s in qkv.addressable_shards}) == fsdp * tensor  # slices: unhashable before 3.12
    assert len(out1.state.params["blocks"]["attn"]["qkv"]["kernel"].sharding.device_set) == 1


@pytest.fixture(scope="module")
def sgd_step():
    """One compiled step, read by the two tests below: 1 device, plain SGD with lr 1 (the update is the
    gradient), 2 micro-batches, EMA decay 0.9 from an EMA that differs from the params (ema = params + 0.1)."""
    import optax

    c = tiny_config(global_batch_size=8, grad_accum_steps=2)
    c.mesh.num_devices = 1
    env = train.setup(c)
    tx = optax.sgd(1.0)
    params = jax.jit(lambda r: init_params(env.model, r))(jax.random.PRNGKey(0))  # one compile, not one per op
    ema = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    st = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, ema_params=ema,
                    opt_state=tx.init(params))
    batch = {k: jax.numpy.asarray(v) for k, v in train.make_source(c).batch(0).items()}
    loss_fn = make_loss_fn(env.model, env.diffusion, c.latent_scale)
    step = make_train_step(loss_fn, tx, build.lr_schedule(c), 0.9, c.grad_accum_steps)
    new, m = jax.jit(step)(st, batch, jax.random.PRNGKey(3), None)
    return dict(params=params, ema=ema, batch=batch, loss_fn=loss_fn, new=new, metrics=m)


def test_ema_update_is_the_formula(sgd_step):
    """One step from a state whose EMA differs from the params: ema' = d * ema + (1 - d) * params'."""
    new, params = sgd_step["new"], sgd_step["params"]
    got, p_new, e_old = _flat(new.ema_params), _flat(new.params), _flat(sgd_step["ema"])
    assert max(rel_err(got[k], 0.9 * e_old[k] + 0.1 * p_new[k]) for k in got) < 1e-6
    assert max(np.abs(p_new[k] - _flat(params)[k]).max() for k in p_new) > 1e-3  # the params did move


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_1_and_4(tmp_path, sharded_run):
    w8 = sharded_run(2, 4, 1)[1]  # 3 steps on data 2 x fsdp 4, saved at step 3
    for n in (8, 1, 4):
        shutil.copytree(w8, tmp_path / f"w{n}")
    ref = tiny_config(num_steps=5)  # the uninterrupted continuation on the original 8-device mesh
    ref.mesh.data, ref.mesh.fsdp = 2, 4
    ref_out = train.train_and_evaluate(ref, str(tmp_path / "w8"))
    assert sorted(ref_out.losses) == [4, 5]  # it resumed at step 3
    for n, fsdp in ((1, 1), (4, 2)):
        c = tiny_config(num_steps=5)
        c.mesh.num_devices, c.mesh.fsdp = n, fsdp
        out = train.train_and_evaluate(c, str(tmp_path / f"w{n}"))
        assert sorted(out.losses) == [4, 5], n
        assert len(out.state.params["blocks"]["attn"]["qkv"]["kernel"].sharding.device_set) == n
        for s in (4, 5):
            assert abs(out.losses[s] - ref_out.losses[s]) <= TOL * abs(ref_out.losses[s]), (n, s)
        pa, pb = _flat(out.state.params), _flat(ref_out.state.params)
        assert max(rel_err(pa[k], pb[k]) for k in pb) < PARAM_TOL, n


@pytest.mark.slow
def test_options_bf16_remat_accum_clip(tmp_path):
    c = tiny_config(num_steps=2, grad_accum_steps=2)
    c.model.dtype, c.model.remat, c.optim.grad_clip = "bfloat16", True, 0.5
    c.mesh.num_devices, c.mesh.fsdp = 2, 2  # sharded all the same; compiled for 2 devices instead of 8
    out = train.train_and_evaluate(c, str(tmp_path / "opts"))
    assert all(np.isfinite(v) for v in out.losses.values())
    assert out.state.params["blocks"]["attn"]["qkv"]["kernel"].dtype == np.float32  # params stay f32


def test_grad_accumulation_is_the_mean_of_micro_batch_gradients(sgd_step):
    """accum=2 applies, by hand, the mean of the gradients of rows 0::2 and 1::2 with their own rngs.

    Plain SGD with lr 1 makes the update equal the gradient (Adam's first step is ~sign(g), which hides
    errors and amplifies float noise in near-zero gradients)."""
    params, batch, loss_fn = sgd_step["params"], sgd_step["batch"], sgd_step["loss_fn"]
    new, m = sgd_step["new"], sgd_step["metrics"]
    key = jax.random.fold_in(jax.random.PRNGKey(3), 0)  # the step-0 rng
    grads, losses = [], []
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # un-jitted it took ~100 s on a CPU
    for i in range(2):
        (loss, _), g = value_and_grad(params, {k: v[i::2] for k, v in batch.items()}, jax.random.fold_in(key, i), None)
        grads.append(g)
        losses.append(float(loss))
    want = _flat(jax.tree_util.tree_map(lambda a, b: -(a + b) / 2, *grads))
    got = _flat(jax.tree_util.tree_map(lambda a, b: a - b, new.params, params))
    assert max(rel_err(got[k], want[k]) for k in want) < PARAM_TOL
    assert abs(float(m["loss"]) - np.mean(losses)) < 1e-6
