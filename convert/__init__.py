"""PyTorch <-> JAX weights for DiT: release .pt files, train.py checkpoints, safetensors, diffusers.

    params, cfg = convert.torch_to_flax(state_dict_or_checkpoint_dict)
    state_dict = convert.flax_to_torch(params, cfg)
"""
from convert.api import flax_to_torch, torch_to_flax  # noqa: F401
from convert.mapping import ConversionError  # noqa: F401
