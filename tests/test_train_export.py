"""--export-torch: the EMA weights as a release .pt that loads into the PyTorch DiT and gives the same outputs."""
import jax
import numpy as np
import torch

from conftest import rel_err, tiny_config
from convert.reference.torch_dit import DiT as TorchDiT
from dit_jax import train
from dit_jax.cli.train import export_torch
from dit_jax.pretrained import model_config


def test_export_torch_loads_strict_and_matches(tmp_path):
    c = tiny_config(num_steps=2)
    c.mesh.fsdp = 4  # exported from sharded parameters
    pt = str(tmp_path / "out" / "ema.pt")
    out = train.train_and_evaluate(c, str(tmp_path / "run"))
    export_torch(pt, out)
    model = out.model
    state = torch.load(pt, weights_only=True)
    tm = TorchDiT(**{k: v for k, v in model_config(model).items()
                     if k not in ("timestep_freq_shift", "mlp_norm_eps")}).eval()
    tm.load_state_dict(state, strict=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)  # NHWC
    t = np.array([0, 500, 999])
    y = np.array([1, 5, 9])
    ema = jax.device_get(out.state.ema_params)
    want = np.asarray(model.apply({"params": ema}, x, t, y, train=False))  # (N, H, W, 2)
    with torch.no_grad():
        got = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    got = got.permute(0, 2, 3, 1).numpy()
    assert rel_err(got, want) < 1e-5  # float32 on both sides, different op order
    assert np.max(np.abs(want)) > 0  # the EMA moved away from the zero-initialised output layer
