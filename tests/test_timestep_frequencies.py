"""The timestep frequencies are PyTorch's float32 computation bit for bit (issue 19): the release's, diffusers'
(freq_shift 1), and for other dims / max_periods the exponents exactly with a measured exp residue.

dit_jax.nn.timestep_frequencies itself never imports torch (tests/test_layering.py); these tests compare with it.
"""
import math

import jax
import numpy as np
import pytest
import torch

from dit_jax.nn.model_ops import timestep_embedding
from dit_jax.nn.timestep_frequencies import frequency_exponents, timestep_frequencies

# Other configurations: dims (odd ones too), max_periods and shifts a user might set. None of them is shipped.
SWEEP = [(dim, mp, shift) for dim in (2, 3, 16, 64, 100, 255, 320, 512, 1024, 2048)
         for mp in (10000, 1000, 100, 10000.5, 1e5) for shift in (0, 1, 0.5, 1 / 3)
         if dim // 2 - shift > 0]


def torch_exponents(dim: int, max_period: float, freq_shift: float) -> torch.Tensor:
    """The release's (freq_shift 0) and diffusers' expression, step by step as they write it."""
    half = dim // 2
    return -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / (half - freq_shift)


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.int32)


@pytest.mark.parametrize("freq_shift", [0, 1])
def test_shipped_frequencies_are_pytorchs(freq_shift):
    ref = bits(torch.exp(torch_exponents(256, 10000, freq_shift)).numpy())  # (128,)
    for dim, mp, shift in [(256, 10000, freq_shift), (257, 10000.0, float(freq_shift))]:
        np.testing.assert_array_equal(bits(timestep_frequencies(dim, mp, shift)), ref)
    # The constants matter: the correctly rounded exp (the fallback for other configurations) differs here.
    rounded = np.exp(frequency_exponents(256, 10000, freq_shift).astype(np.float64)).astype(np.float32)
    assert np.count_nonzero(bits(rounded) != ref) >= 1


def test_exponents_bit_identical_to_pytorch():
    for dim, mp, shift in SWEEP:
        np.testing.assert_array_equal(bits(frequency_exponents(dim, mp, shift)),
                                      bits(torch_exponents(dim, mp, shift).numpy()), err_msg=f"{dim} {mp} {shift}")


def test_other_configurations_within_one_ulp_of_pytorch():
    """Not shipped: exp correctly rounded, PyTorch's (MKL's) exp is not; measured 1.1% of the values differ,
    each by one ulp (the sweep below; 1.0% over dims 2-1028, 8 max_periods, 4 shifts)."""
    total = differ = 0
    for dim, mp, shift in SWEEP:
        d = bits(timestep_frequencies(dim, mp, shift)) - bits(torch.exp(torch_exponents(dim, mp, shift)).numpy())
        assert np.abs(d).max(initial=0) <= 1, f"dim {dim} max_period {mp} freq_shift {shift}: {np.abs(d).max()} ulp"
        total, differ = total + d.size, differ + np.count_nonzero(d)
    print(f"\nfrequencies one ulp from PyTorch's: {differ} of {total} ({100 * differ / total:.2f}%)")
    assert differ <= 0.02 * total


def test_diffusers_features():
    """freq_shift 1 is diffusers' DiT timestep projection (flip_sin_to_cos: the same cat([cos, sin]))."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = np.arange(1000, dtype=np.float32)
    ref = embeddings.get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                            downscale_freq_shift=1).double().numpy()
    ours = np.asarray(jax.jit(lambda t: timestep_embedding(t, 256, freq_shift=1.0))(t), np.float64)
    err = np.abs(ours - ref).max()
    print(f"\ndiffusers' features: max abs {err:.2e}")
    assert err <= 2e-7


@pytest.mark.parametrize("kwargs, match", [({"dim": -2}, "dim >= 0"), ({"dim": 256, "max_period": 0}, "max_period > 0"),
                                           ({"dim": 4, "freq_shift": 2}, "freq_shift must be below")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timestep_frequencies(**kwargs)
