"""--export-torch: the EMA weights as a release .pt that loads into the PyTorch DiT and gives the same outputs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

from convert.torch_dit import DiT as TorchDiT  # noqa: E402
from dit_jax import train  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.train_tiny import tiny_config  # noqa: E402


def test_export_torch_loads_strict_and_matches(tmp_path):
    c = tiny_config(num_steps=2)
    c.mesh.fsdp = 4  # exported from sharded parameters
    pt = str(tmp_path / "out" / "ema.pt")
    out = train.train_and_evaluate(c, str(tmp_path / "run"), export_torch_path=pt)
    model = out["model"]
    state = torch.load(pt, weights_only=True)
    tm = TorchDiT(**train.torch_config(model)).eval()
    tm.load_state_dict(state, strict=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)  # NHWC
    t = np.array([0, 500, 999])
    y = np.array([1, 5, 9])
    ema = jax.device_get(out["state"]["ema_params"])
    want = np.asarray(model.apply({"params": ema}, x, t, y, train=False))  # (N, H, W, 2)
    with torch.no_grad():
        got = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    got = got.permute(0, 2, 3, 1).numpy()
    assert rel_err(got, want) < 1e-5  # float32 on both sides, different op order
    assert np.max(np.abs(want)) > 0  # the EMA moved away from the zero-initialised output layer
