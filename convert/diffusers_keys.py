"""diffusers `DiTTransformer2DModel` state_dict <-> release-layout state_dict (NumPy arrays).

diffusers differs from the release in three ways that matter here:
- q, k, v are separate Linears (`attn1.to_q/to_k/to_v`) where the release fuses them into `attn.qkv`;
- every block holds its own copy of the timestep/label embedder (`norm1.emb`); the official conversion
  copies one embedder into all of them, and dit_jax has one, so the copies must be equal;
- its timestep features divide by (half - 1) and its MLP LayerNorm uses `norm_eps` (1e-5 by default), so
  a model read from diffusers carries `timestep_freq_shift=1` and `mlp_norm_eps` in its config, and
  dit_jax reproduces diffusers' outputs exactly. Writing weights into the other family's format warns with
  the measured size of the change (TimestepMathsWarning).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from convert.mapping import ConversionError

_EMB = "transformer_blocks.{i}.norm1.emb."
# One line per key family: diffusers name (with {i} for the block) -> release name.
BLOCK_RENAMES = [
    ("transformer_blocks.{i}.norm1.linear.{w}", "blocks.{i}.adaLN_modulation.1.{w}"),
    ("transformer_blocks.{i}.attn1.to_out.0.{w}", "blocks.{i}.attn.proj.{w}"),
    ("transformer_blocks.{i}.ff.net.0.proj.{w}", "blocks.{i}.mlp.fc1.{w}"),
    ("transformer_blocks.{i}.ff.net.2.{w}", "blocks.{i}.mlp.fc2.{w}"),
]
EMBEDDER_RENAMES = [
    ("timestep_embedder.linear_1.{w}", "t_embedder.mlp.0.{w}"),
    ("timestep_embedder.linear_2.{w}", "t_embedder.mlp.2.{w}"),
    ("class_embedder.embedding_table.weight", "y_embedder.embedding_table.weight"),
]
TOP_RENAMES = [
    ("pos_embed.proj.{w}", "x_embedder.proj.{w}"),
    ("proj_out_1.{w}", "final_layer.adaLN_modulation.1.{w}"),
    ("proj_out_2.{w}", "final_layer.linear.{w}"),
]
QKV = ("to_q", "to_k", "to_v")
DIFFUSERS_FREQ_SHIFT = 1.0
DIFFUSERS_DEFAULT_NORM_EPS = 1e-5

# How much the other format's timestep maths change the outputs of the same weights, measured with
# scripts/diffusers_gap.py (docs/convert.md): rel = max|a - b| / max|b| of the model output on the same inputs,
# the largest over t = 100, 250, 500, 750, 999 (at t = 0 every frequency gives cos 1, sin 0: no difference).
GAP_TRAINED_TO_DIFFUSERS = 0.033  # digits DiT trained 2000 steps with the release maths, run by diffusers
GAP_TRAINED_FROM_DIFFUSERS = 0.125  # digits DiT trained 2000 steps with diffusers' maths, run by the release
GAP_RANDOM = {"DiT-S/2": 0.21, "DiT-B/4": 0.42}  # depth 2, random weights (tests/test_diffusers_parity.py)


def measured_gap(trained: float) -> str:
    return (f"measured output difference max|d|/max|out| up to {trained:.1%} on a trained DiT (digits), "
            f"{GAP_RANDOM['DiT-S/2']:.0%} (S/2) and {GAP_RANDOM['DiT-B/4']:.0%} (B/4) on random depth-2 weights; "
            f"see docs/convert.md")


class TimestepMathsWarning(UserWarning):
    """Weights written for a model that computes the timestep features (and MLP eps) unlike their source."""


def is_diffusers_state_dict(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("transformer_blocks.") for k in state)


def _depth(state: Mapping[str, Any]) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})


def _take(state: Dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"missing key {key!r} in the diffusers DiT state_dict")
    return state.pop(key)


def diffusers_to_release(state: Mapping[str, np.ndarray], config: Optional[Mapping[str, Any]] = None
                         ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Returns (release-layout state_dict, extra DiT kwargs: timestep_freq_shift, mlp_norm_eps,
    and input_size/num_heads when a diffusers config.json is given)."""
    config = dict(config or {})
    src = dict(state)
    pos = src.pop("pos_embed.pos_embed", None)  # a buffer, recomputed from the size
    depth = _depth(src)
    if pos is not None and "sample_size" not in config and "pos_embed.proj.weight" in src:
        # No config.json: the buffer still tells the latent size, (1, T, D) with T = (size / patch)^2.
        config["sample_size"] = int(round(np.asarray(pos).shape[1] ** 0.5)) * src["pos_embed.proj.weight"].shape[-1]
    if depth == 0:
        raise ConversionError("no transformer_blocks.* keys: not a diffusers DiT state_dict")
    out: Dict[str, np.ndarray] = {}
    for old, new in TOP_RENAMES:
        for w in ("weight", "bias"):
            out[new.format(w=w)] = _take(src, old.format(w=w))
    emb0 = {}
    for old, new in EMBEDDER_RENAMES:
        for w in ("weight", "bias"):
            if "{w}" not in old and w == "bias":
                continue
            emb0[new.format(w=w)] = _take(src, _EMB.format(i=0) + old.format(w=w))
    out.update(emb0)
    for i in range(depth):
        for old, new in BLOCK_RENAMES:
            for w in ("weight", "bias"):
                out[new.format(i=i, w=w)] = _take(src, old.format(i=i, w=w))
        for w in ("weight", "bias"):
            parts = [_take(src, f"transformer_blocks.{i}.attn1.{name}.{w}") for name in QKV]
            out[f"blocks.{i}.attn.qkv.{w}"] = np.concatenate(parts, axis=0)
        if i > 0:  # per-block embedder copies must equal block 0's: dit_jax has one embedder
            for old, new in EMBEDDER_RENAMES:
                for w in ("weight", "bias"):
                    if "{w}" not in old and w == "bias":
                        continue
                    key = _EMB.format(i=i) + old.format(w=w)
                    if key in src and not np.array_equal(_take(src, key), emb0[new.format(w=w)]):
                        raise ConversionError(
                            f"{key!r} differs from block 0's copy; DiT shares one timestep/label embedder "
                            f"across blocks, so this diffusers model cannot be represented")
    if src:
        left = sorted(src)
        raise ConversionError(f"unexpected keys in the diffusers DiT state_dict ({len(left)}): {left[:8]}")
    extra: Dict[str, Any] = {
        "timestep_freq_shift": DIFFUSERS_FREQ_SHIFT,
        "mlp_norm_eps": float(config.get("norm_eps", DIFFUSERS_DEFAULT_NORM_EPS)),
    }
    if "sample_size" in config:
        extra["input_size"] = int(config["sample_size"])
    if "num_attention_heads" in config:
        extra["num_heads"] = int(config["num_attention_heads"])
    return out, extra


def release_to_diffusers(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any]
                         ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Release-layout state_dict + DiT kwargs -> (diffusers state_dict, DiTTransformer2DModel config)."""
    if cfg.get("timestep_freq_shift", 0.0) != DIFFUSERS_FREQ_SHIFT:
        warnings.warn("diffusers' DiTTransformer2DModel divides its timestep frequencies by (half - 1) where the "
                      "release divides by half, so the diffusers model computes a different function of these "
                      f"weights: {measured_gap(GAP_TRAINED_TO_DIFFUSERS)}. dit_jax reads the folder back with "
                      "diffusers' maths (equal to diffusers within 1e-5); to sample as trained, keep the .pt, "
                      ".safetensors or dit_jax copy", TimestepMathsWarning, stacklevel=2)
    src = dict(state)
    src.pop("pos_embed", None)
    out: Dict[str, np.ndarray] = {}
    for new, old in TOP_RENAMES:
        for w in ("weight", "bias"):
            out[new.format(w=w)] = _take(src, old.format(w=w))
    emb = {}
    for new, old in EMBEDDER_RENAMES:
        for w in ("weight", "bias"):
            if "{w}" not in new and w == "bias":
                continue
            emb[new.format(w=w)] = _take(src, old.format(w=w))
    d = cfg["hidden_size"]
    for i in range(cfg["depth"]):
        for new, old in BLOCK_RENAMES:
            for w in ("weight", "bias"):
                out[new.format(i=i, w=w)] = _take(src, old.format(i=i, w=w))
        for w in ("weight", "bias"):
            qkv = _take(src, f"blocks.{i}.attn.qkv.{w}")
            for j, name in enumerate(QKV):
                out[f"transformer_blocks.{i}.attn1.{name}.{w}"] = np.ascontiguousarray(qkv[j * d:(j + 1) * d])
        for key, value in emb.items():
            out[_EMB.format(i=i) + key] = value
    if src:
        raise ConversionError(f"unexpected keys for a DiT state_dict: {sorted(src)[:8]}")
    if cfg.get("class_dropout_prob", 0.1) <= 0:
        raise ConversionError("diffusers' DiT always has the null-class row (class dropout > 0); this model has none")
    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": cfg["num_heads"],
        "attention_head_dim": d // cfg["num_heads"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["in_channels"] * (2 if cfg.get("learn_sigma", True) else 1),
        "num_layers": cfg["depth"],
        "sample_size": cfg["input_size"],
        "patch_size": cfg["patch_size"],
        "num_embeds_ada_norm": cfg["num_classes"],
        "norm_eps": cfg.get("mlp_norm_eps", 1e-6),  # the MLP LayerNorm; 1e-6 keeps the release's value
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
    }
    return out, config
