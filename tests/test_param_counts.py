"""Parameter counts of the 12 sizes vs the DiT paper (Peebles & Xie 2022, Table 4), 256 px (latent 32).

Shapes only (jax.eval_shape): nothing is allocated. Counts include the fixed pos_embed, which the release
stores as a (non-trained) parameter; dit_jax computes it on the fly, so it is added as T * D here.
Table 4 lists one figure per model size (S 33M, B 130M, L 458M, XL 675M); the patch size changes the count
by less than one million (the patch embedding and output layer grow, pos_embed shrinks), so "to the
million" means |count - table| < 1e6. Exact counts (run with -s to print them):
  S/2 32,963,360  S/4 32,945,024  S/8 33,148,160      B/2 130,512,416  B/4 130,475,648  B/8 130,881,536
  L/2 458,102,816 L/4 458,053,760 L/8 458,594,816     XL/2 675,129,632 XL/4 675,074,432 XL/8 675,683,072
"""
import jax
import jax.numpy as jnp
import pytest
import torch

from convert.reference.torch_dit import DiT_models as TORCH_MODELS
from dit_jax.model import DiT_models, count_params

TABLE4_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}
SIZES = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}  # (depth, width), paper Table 1


def formula(name: str, latent: int = 32, classes: int = 1000, c: int = 4) -> int:
    """Count written out from the architecture description, independent of both implementations."""
    size, p = name.split("-")[1].split("/")
    depth, d = SIZES[size]
    p = int(p)
    patch = p * p * c * d + d
    t_emb = 256 * d + d + d * d + d
    y_emb = (classes + 1) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (d * p * p * 2 * c + p * p * 2 * c)
    pos = (latent // p) ** 2 * d
    return patch + t_emb + y_emb + depth * block + final + pos


def flax_count(name: str) -> int:
    model = DiT_models[name](input_size=32, num_classes=1000)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)  # (N, H, W, C)
    i = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda a, b, c: model.init(jax.random.PRNGKey(0), a, b, c), x, i, i)["params"]
    tokens = (32 // model.patch_size) ** 2
    return count_params(shapes) + tokens * model.hidden_size  # + pos_embed (1, T, D)


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_param_count_matches_table4(name):
    n = flax_count(name)
    size = name.split("-")[1].split("/")[0]
    print(f"\nPARAMS {name}: {n:,} ({n / 1e6:.2f}M; Table 4: {TABLE4_MILLIONS[size]}M)")
    assert abs(n - TABLE4_MILLIONS[size] * 1_000_000) < 1_000_000
    assert n == formula(name)


def test_s2_exact_and_torch_reference_agrees():
    assert flax_count("DiT-S/2") == 32_963_360
    for name in ("DiT-S/2", "DiT-XL/8"):
        with torch.device("meta"):  # shapes only, no memory
            tm = TORCH_MODELS[name](input_size=32, num_classes=1000)
        assert sum(p.numel() for p in tm.parameters()) == flax_count(name), name
