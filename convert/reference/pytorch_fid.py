"""pytorch-fid (the reference for the FID Inception) loaded beside the CPU torch wheel, with random weights.

torchvision's PyPI wheel fails to register its C operators next to the CPU torch wheel, so `import torchvision`
raises. pytorch-fid needs only the pure-Python `torchvision.models.inception` module, so this helper puts
stand-in package modules for `torchvision`, `torchvision.models` and `torchvision.transforms` into
sys.modules: each has torchvision's folder as its `__path__` (so its submodules load from the real files) but
none of their `__init__.py` runs. scripts/setup_env.sh installs pytorch-fid with `pip install --no-deps`, and
torchvision's files with `--no-deps --target <venv>/share/torchvision-files`, outside the import path:
installed as a package, diffusers would import it (and fail the same way), and pip never resolves
torchvision's torch pin to a CUDA build.

    fid = load_pytorch_fid()          # -> the pytorch_fid.inception module (ImportError when not installed)
    fid_score = load_fid_score()      # -> pytorch_fid.fid_score (calculate_frechet_distance)
    ref = TorchInception(seed=0)      # pytorch-fid's own InceptionV3 with random weights (its downloader patched)
    out = ref(images_uint8_nhwc)      # {"pool", "logits", "spatial"} as float64 NumPy
    params = ref.flax_params()        # the same weights through convert.inception_weights

The random state dict is generated from convert.inception_weights.torch_keys() and loaded by pytorch-fid
with load_state_dict(strict=True), so the converter's key table is checked against pytorch-fid's model.
BatchNorm statistics are random (not 0/1), so the converter's folding is exercised. Used by the parity
tests and benchmarks/inception_speed.py; nothing in dit_jax imports it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from importlib.metadata import PackageNotFoundError, version as dist_version

import numpy as np
import torch

from convert.inception_weights import inception_torch_to_flax, torch_keys

_STUBS = ("torchvision", "torchvision.models", "torchvision.transforms")


def _install_stubs() -> None:
    if isinstance(sys.modules.get("torchvision"), types.ModuleType) and getattr(
            sys.modules["torchvision"], "_dit_jax_stub", False):
        return
    files = os.path.join(sys.prefix, "share", "torchvision-files")
    root = os.path.join(files, "torchvision")
    if not os.path.isdir(root):
        spec = importlib.util.find_spec("torchvision")  # an installed package: locates the folder, runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"torchvision's files are not in {files} (scripts/setup_env.sh puts them there)")
        root = list(spec.submodule_search_locations)[0]
    try:
        version = dist_version("torchvision")
    except PackageNotFoundError:  # only used for pytorch-fid's version check
        version = next((d[len("torchvision-"):].split("-")[0] for d in os.listdir(files)
                        if d.startswith("torchvision-") and d.endswith(".dist-info")), "0.0") \
            if os.path.isdir(files) else "0.0"
    for name in _STUBS:
        mod = types.ModuleType(name)
        sub = name.split(".")[1:]
        mod.__path__ = [root + ("/" + "/".join(sub) if sub else "")]
        # A spec like a real package's: importlib.util.find_spec("torchvision") (diffusers' availability probe)
        # raises ValueError on a module whose __spec__ is None.
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__spec__.submodule_search_locations = list(mod.__path__)
        mod.__package__ = name
        mod._dit_jax_stub = True
        if name == "torchvision":
            mod.__version__ = version.split("+")[0]
        sys.modules[name] = mod
        if sub:
            setattr(sys.modules["torchvision"], sub[0], mod)
    functional = importlib.import_module("torchvision.transforms.functional")  # _presets wants these two names
    sys.modules["torchvision.transforms"].InterpolationMode = functional.InterpolationMode
    sys.modules["torchvision.transforms"].functional = functional
    inception = importlib.import_module("torchvision.models.inception")
    sys.modules["torchvision.models"].inception_v3 = inception.inception_v3


def load_pytorch_fid():
    """pytorch_fid.inception with torchvision stubbed (see the module docstring)."""
    if importlib.util.find_spec("pytorch_fid") is None:
        raise ImportError("pytorch-fid is not installed (scripts/setup_env.sh installs it with --no-deps)")
    _install_stubs()
    return importlib.import_module("pytorch_fid.inception")


def load_fid_score():
    load_pytorch_fid()
    return importlib.import_module("pytorch_fid.fid_score")


def random_state_dict(seed: int = 0):
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

    def __call__(self, images: np.ndarray) -> dict:
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
        return inception_torch_to_flax(self.state_dict)
