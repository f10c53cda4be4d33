"""PyTorch <-> JAX weights for DiT: release .pt files, train.py checkpoints, safetensors, diffusers.

    params, cfg = convert.torch_to_flax(state_dict_or_checkpoint_dict)
    state_dict = convert.flax_to_torch(params, cfg)
    params, cfg = convert.load_torch_checkpoint("DiT-XL-2-256x256.pt")   # any format on disk
    model, params = convert.load_any("DiT-XL-2-256x256.pt")            # or a dit_jax directory

The package sits above dit_jax: it imports dit_jax (the model, the size table, atomic writes), never the
reverse. convert/reference/ holds the PyTorch DiT and diffusion used by parity tests and benchmarks.

Command line: `dit-jax-convert to-flax|to-torch IN OUT` (dit_jax/cli/convert.py); docs/convert.md.
"""
from convert.api import flax_to_torch, load_any, load_torch_checkpoint, torch_to_flax  # noqa: F401
from convert.mapping import ConversionError  # noqa: F401
