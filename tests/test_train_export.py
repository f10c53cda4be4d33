"""--export-torch: EMA weights as a release .pt that loads strictly into the PyTorch DiT; gathered from sharded
arrays tensor by tensor, with outputs equal to the JAX model's (perturbed weights, so every block counts)."""
import dataclasses

import jax
import numpy as np
import pytest
import torch

import convert
from conftest import rel_err, tiny_config
from convert.reference.torch_dit import DiT as TorchDiT
from dit_jax import train
from dit_jax.cli.train import export_torch
from dit_jax.pretrained import model_config
from dit_jax.training.state import init_state


@pytest.mark.slow
def test_export_of_sharded_perturbed_ema_is_exact(tmp_path):
    c = tiny_config(num_steps=1)
    c.model.depth = 2
    c.mesh.fsdp = 4  # exported from parameters sharded over 4 devices
    # A run's result as train_and_evaluate returns it, its state fresh from the run's setup (the state's values
    # are replaced below; no training step needs compiling): the run's model, mesh and state shardings.
    s = train.setup(c)
    state = init_state(s.model, s.tx, jax.random.PRNGKey(0), s.state_shardings)
    out = train.TrainResult(state=state, losses={}, metrics={}, model=s.model, mesh=s.mesh)
    ema = out.state.ema_params
    # Replace the (nearly zero-gated) EMA by perturbed weights in the same shardings.
    leaves, tree = jax.tree_util.tree_flatten(ema)
    r = np.random.default_rng(0)
    host = [np.asarray(jax.device_get(x)) + 0.05 * r.standard_normal(x.shape).astype(np.float32) for x in leaves]
    sharded = [jax.device_put(h, x.sharding) for h, x in zip(host, leaves)]
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated for x in sharded)
    out = dataclasses.replace(out, state=out.state.replace(ema_params=jax.tree_util.tree_unflatten(tree, sharded)))
    pt = str(tmp_path / "out" / "ema.pt")
    export_torch(pt, out)

    state = torch.load(pt, weights_only=True)
    want = convert.flax_to_torch(jax.tree_util.tree_unflatten(tree, host), model_config(out.model), as_numpy=True)
    assert list(state) == list(want)  # the release's key order
    for k, v in want.items():
        np.testing.assert_array_equal(state[k].numpy(), v, err_msg=k)

    kwargs = {k: v for k, v in model_config(out.model).items() if k not in ("timestep_freq_shift", "mlp_norm_eps")}
    tm = TorchDiT(**kwargs).eval()
    tm.load_state_dict(state, strict=True)
    x = r.standard_normal((3, 8, 8, 1)).astype(np.float32)  # NHWC
    t, y = np.array([0, 500, 999]), np.array([1, 5, 9])
    apply = jax.jit(lambda p, x, t, y: out.model.apply({"params": p}, x, t, y))  # one compile, not one per op
    jax_out = np.asarray(apply(jax.tree_util.tree_unflatten(tree, host), x, t, y))
    with torch.no_grad():
        got = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    got = got.permute(0, 2, 3, 1).numpy()
    assert rel_err(got, jax_out) < 1e-5  # float32 on both sides, different op order
    # The check can fail: the blocks reach the output (zeroing one block's weights moves it).
    zeroed = {k: (torch.zeros_like(v) if k.startswith("blocks.1.mlp") else v) for k, v in state.items()}
    tm.load_state_dict(zeroed, strict=True)
    with torch.no_grad():
        moved = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    assert rel_err(moved.permute(0, 2, 3, 1).numpy(), jax_out) > 1e-3
