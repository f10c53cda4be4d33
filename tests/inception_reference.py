"""pytorch-fid's InceptionV3 with random weights, and the same weights converted to the Flax params.

    ref = TorchInception(seed=0)        # pytorch-fid's own modules (its downloader patched)
    out = ref(images_uint8_nhwc)        # {"pool", "logits", "spatial"} as float64 NumPy
    params = ref.flax_params()          # convert.inception_weights.inception_torch_to_flax(ref.state_dict)

The random state dict is generated from convert.inception_weights.torch_keys() and loaded with
load_state_dict(strict=True), so the converter's key table is checked against pytorch-fid's model too.
BatchNorm statistics are random (not 0/1), so the folding in the converter is exercised.
"""
from __future__ import annotations

import numpy as np

from tests.pytorch_fid_loader import load_pytorch_fid


def random_state_dict(seed: int = 0):
    import torch

    from convert.inception_weights import torch_keys

    g = np.random.default_rng(seed)
    sd = {}
    for k, shape in torch_keys().items():
        if k.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            a = g.normal(0, np.sqrt(2.0 / fan_in), shape)
        elif k.endswith("bn.weight"):
            a = g.uniform(0.6, 1.4, shape)
        elif k.endswith("bn.bias"):
            a = g.normal(0, 0.2, shape)
        elif k.endswith("running_mean"):
            a = g.normal(0, 0.2, shape)
        elif k.endswith("running_var"):
            a = g.uniform(0.5, 2.0, shape)
        elif k == "fc.weight":
            a = g.normal(0, 0.05, shape)
        else:  # fc.bias
            a = g.normal(0, 0.5, shape)
        sd[k] = torch.tensor(a, dtype=torch.float32)
    return sd


class TorchInception:
    def __init__(self, seed: int = 0):
        import torch

        fid = load_pytorch_fid()
        self.state_dict = random_state_dict(seed)
        built = {}
        orig_loader, orig_build = fid.load_state_dict_from_url, fid.fid_inception_v3

        def build():  # pytorch-fid's own builder; keep the full model for fc
            built["net"] = orig_build()
            return built["net"]

        fid.load_state_dict_from_url = lambda *a, **k: self.state_dict
        fid.fid_inception_v3 = build
        try:
            self.wrapper = fid.InceptionV3(output_blocks=[3]).eval()  # resize + normalize + pool3, as FID uses it
        finally:
            fid.load_state_dict_from_url, fid.fid_inception_v3 = orig_loader, orig_build
        self.net = built["net"].eval()
        self.torch = torch

    def __call__(self, images: np.ndarray) -> dict:
        torch = self.torch
        taps = {}
        hook = self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("s", o))
        try:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                pool = self.wrapper(x)[0].flatten(1)  # (N, 2048)
                logits = self.net.fc(pool)
        finally:
            hook.remove()
        spatial = taps["s"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # NHWC order, like TF
        return {"pool": pool.double().numpy(), "logits": logits.double().numpy(),
                "spatial": spatial.double().numpy()}

    def flax_params(self):
        from convert.inception_weights import inception_torch_to_flax

        return inception_torch_to_flax(self.state_dict)
