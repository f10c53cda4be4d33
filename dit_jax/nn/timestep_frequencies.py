"""The release's timestep frequencies, bit for bit: part of the model's definition, not an approximation.

The release computes `exp(-log(max_period) * arange(half, float32) / half)` in float32 and every checkpoint
learned on those rounded values; each sinusoid's argument is then one float32 product `t.float() * freq`.
A frequency one ulp off moves t * freq by up to 6e-5 at t ~ 1000 (XLA's float32 exp is off by one ulp on 17
of the 128), so the values used here are PyTorch's own:
- dim 256, max_period 10000 (every released and trained DiT): the 128 values as float32 bit patterns, for
  freq_shift 0 (the release) and 1 (diffusers, which divides by half - 1), taken from PyTorch 2.13's CPU
  `torch.exp`, which is MKL's vsExp (high-accuracy mode, not correctly rounded: 2 of the release's 128
  values and 1 of diffusers' differ from the correctly rounded ones; the same bits with ATen's AVX-512,
  AVX2 and scalar kernels). tests/test_timestep_frequencies.py checks them against PyTorch.
- any other dim / max_period / freq_shift: the exponents rounded exactly as PyTorch rounds them, then exp
  correctly rounded; about 1% of such values then differ from PyTorch's (MKL's) by one ulp (measured there).
The core computes these without torch.
"""
from __future__ import annotations

import math

import numpy as np

# dim 256, max_period 10000, freq_shift 0: torch.exp(-math.log(10000) * torch.arange(128, dtype=float32) / 128)
_RELEASE_256 = (
    0x3f800000, 0x3f6e39f8, 0x3f5dafd6, 0x3f4e4bac, 0x3f3ff911, 0x3f32a506, 0x3f263de0, 0x3f1ab32b,
    0x3f0ff59a, 0x3f05f6ee, 0x3ef953ce, 0x3ee80460, 0x3ed7e89b, 0x3ec8eb23, 0x3ebaf81b, 0x3eadfcff,
    0x3ea1e89b, 0x3e96aaea, 0x3e8c3503, 0x3e827908, 0x3e72d422, 0x3e61f836, 0x3e5247ed, 0x3e43ae7c,
    0x3e361887, 0x3e297409, 0x3e1db03f, 0x3e12bd90, 0x3e088d77, 0x3dfe24df, 0x3dec7fd5, 0x3ddc1464,
    0x3dcccccc, 0x3dbe94c7, 0x3db15978, 0x3da50957, 0x3d99940d, 0x3d8eea6c, 0x3d84fe4c, 0x3d778511,
    0x3d6655c1, 0x3d5657e3, 0x3d477640, 0x3d399d18, 0x3d2cba15, 0x3d20bc1b, 0x3d159348, 0x3d0b30cb,
    0x3d0186e2, 0x3cf11177, 0x3ce054d1, 0x3cd0c1a8, 0x3cc2434e, 0x3cb4c691, 0x3ca83989, 0x3c9c8b96,
    0x3c91ad39, 0x3c879009, 0x3c7c4d30, 0x3c6ac8e6, 0x3c5a7bf1, 0x3c4b50b5, 0x3c3d330e, 0x3c301050,
    0x3c23d70a, 0x3c187706, 0x3c0de12e, 0x3c040777, 0x3bf5b9ad, 0x3be4aa45, 0x3bd4ca15, 0x3bc6040a,
    0x3bb8449a, 0x3bab7982, 0x3b9f91cc, 0x3b947daf, 0x3b8a2e75, 0x3b80967c, 0x3b6f520d, 0x3b5eb47a,
    0x3b4f3e33, 0x3b40dac2, 0x3b33770d, 0x3b270153, 0x3b1b690d, 0x3b109ed8, 0x3b06946d, 0x3afa78f0,
    0x3ae91528, 0x3ad8e675, 0x3ac9d759, 0x3abbd3eb, 0x3aaec98e, 0x3aa2a6f7, 0x3a975c0b, 0x3a8cd9d9,
    0x3a83126e, 0x3a73f1a2, 0x3a6301e3, 0x3a533f24, 0x3a44948a, 0x3a36ee9d, 0x3a2a3b44, 0x3a1e69a2,
    0x3a136a14, 0x3a092e01, 0x39ff4fad, 0x39ed95e4, 0x39dd1721, 0x39cdbd93, 0x39bf74d6, 0x39b229fb,
    0x39a5cb61, 0x399a48a0, 0x398f9275, 0x39859aa4, 0x3978a80d, 0x3967648c, 0x395753e2, 0x394860bf,
    0x393a7753, 0x392d852a, 0x39217919, 0x39164326, 0x390bd46d, 0x39021f28, 0x38f22cdd, 0x38e15c8e,
)

# dim 256, max_period 10000, freq_shift 1: diffusers' get_timestep_embedding (divides by 128 - 1)
_DIFFUSERS_256 = (
    0x3f800000, 0x3f6e176d, 0x3f5d6f91, 0x3f4df1fc, 0x3f3f89d0, 0x3f3223a6, 0x3f25ad72, 0x3f1a1669,
    0x3f0f4eef, 0x3f05487f, 0x3ef7eb30, 0x3ee69358, 0x3ed67215, 0x3ec771af, 0x3eb97df0, 0x3eac8410,
    0x3ea0728f, 0x3e953930, 0x3e8ac8d2, 0x3e811366, 0x3e7017b0, 0x3e5f4c01, 0x3e4fad17, 0x3e4125ec,
    0x3e33a2ed, 0x3e2711e8, 0x3e1b61f1, 0x3e108345, 0x3e066743, 0x3dfa009a, 0x3de88372, 0x3dd83f77,
    0x3dc91ecd, 0x3dbb0d0a, 0x3dadf73c, 0x3da1cbc7, 0x3d967a3f, 0x3d8bf36d, 0x3d82291c, 0x3d721c45,
    0x3d612c6c, 0x3d516bea, 0x3d42c580, 0x3d35256c, 0x3d287960, 0x3d1cb03f, 0x3d11ba33, 0x3d078871,
    0x3cfc1a7f, 0x3cea77b7, 0x3cda10bd, 0x3ccacf86, 0x3cbc9f7e, 0x3caf6d89, 0x3ca327e2, 0x3c97be02,
    0x3c8d2088, 0x3c83412a, 0x3c74252c, 0x3c6310e9, 0x3c532e83, 0x3c44688d, 0x3c36ab29, 0x3c29e3d9,
    0x3c1e0162, 0x3c12f3c0, 0x3c08ac0d, 0x3bfe38e6, 0x3bec702c, 0x3bdbe5ef, 0x3bcc83e6, 0x3bbe354d,
    0x3bb0e6f8, 0x3ba486ed, 0x3b990480, 0x3b8e5032, 0x3b845b8d, 0x3b763277, 0x3b64f975, 0x3b54f4e2,
    0x3b460f1d, 0x3b38342f, 0x3b2b5161, 0x3b1f5557, 0x3b142fee, 0x3b09d218, 0x3b002df0, 0x3aee6ce3,
    0x3addbf0f, 0x3ace3bed, 0x3abfce8c, 0x3ab26396, 0x3aa5e8eb, 0x3a9a4dbb, 0x3a8f8260, 0x3a857854,
    0x3a78442d, 0x3a66e61d, 0x3a56bf13, 0x3a47b946, 0x3a39c083, 0x3a2cc1fb, 0x3a20ac28, 0x3a156ebf,
    0x3a0afaa4, 0x3a0141ba, 0x39f06de0, 0x39df9c29, 0x39cff7a1, 0x39c16b3c, 0x39b3e367, 0x39a74de7,
    0x399b99b4, 0x3990b725, 0x39869784, 0x397a5a4f, 0x3968d6e1, 0x39588d16, 0x394966fe, 0x393b5031,
    0x392e35b4, 0x392205e0, 0x3916b042, 0x390c25aa, 0x390257d0, 0x38f27325, 0x38e17d3f, 0x38d1b716,
)

_SHIPPED = {(128, 10000.0, 0.0): _RELEASE_256, (128, 10000.0, 1.0): _DIFFUSERS_256}


def frequency_exponents(dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> np.ndarray:
    """(dim // 2,) float32 `-log(max_period) * arange(half) / (half - freq_shift)` rounded as PyTorch rounds
    it: the Python scalars are applied in float32, one rounding per step (bit-identical, tested)."""
    half = int(dim) // 2
    if int(dim) < 0 or not float(max_period) > 0.0:
        raise ValueError(f"timestep features need dim >= 0 and max_period > 0, got dim={dim}, max_period={max_period}")
    if half and not half - freq_shift > 0:
        raise ValueError(f"freq_shift must be below dim // 2 = {half} (the exponent divides by dim // 2 - "
                         f"freq_shift), got {freq_shift}")
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)  # (half,)
    return exponent / np.float32(half - freq_shift)


def timestep_frequencies(dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> np.ndarray:
    """(dim // 2,) float32: the frequencies of the release's (freq_shift 0) or diffusers' (1) timestep features."""
    exponent = frequency_exponents(dim, max_period, freq_shift)  # validates the arguments
    shipped = _SHIPPED.get((len(exponent), float(max_period), float(freq_shift)))
    if shipped is not None:
        return np.array(shipped, np.uint32).view(np.float32)
    # exp correctly rounded (float64, then one rounding); PyTorch's MKL exp differs by 1 ulp on ~1% of values
    return np.exp(exponent.astype(np.float64)).astype(np.float32)
