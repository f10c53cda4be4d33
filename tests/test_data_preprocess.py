"""The ADM centre crop against a direct PIL implementation, the flips and the [-1, 1] scaling."""
import numpy as np
import pytest
from PIL import Image

from dit_jax.data.preprocess import center_crop, flip_mask, open_rgb
from dit_jax.utils.images import to_model_range


def reference_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The DiT release's crop, stated directly in PIL calls: box-halve while the short side >= 2 * size,
    bicubic so the short side is `size` (each side rounded), then crop the centre box (floor offsets)."""
    w, h = img.size
    while w >= 2 * size and h >= 2 * size:
        img = img.resize((w // 2, h // 2), Image.BOX)
        w, h = img.size
    s = size / (w if w < h else h)
    img = img.resize((int(round(w * s)), int(round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("wh", [(700, 300), (300, 901), (1037, 522), (45, 38), (64, 64), (64, 200), (129, 128)],
                         ids=["landscape", "portrait", "large-landscape", "smaller", "exact", "thin", "just-2x"])
def test_center_crop_matches_direct_pil(wh, rng):
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    got = center_crop(img, 64)
    want = reference_center_crop(img, 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)  # pixel for pixel


def test_open_rgb_converts_gray_and_rgba(tmp_path, rng):
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    g = np.asarray(open_rgb(str(tmp_path / "g.png")))
    assert g.shape == (20, 30, 3) and (g == gray[..., None]).all()
    assert np.asarray(open_rgb(str(tmp_path / "a.png"))).shape == (20, 30, 3)
    assert np.asarray(open_rgb(gray[..., None])).shape == (20, 30, 3)


def test_scaling_and_flip_mask():
    x = to_model_range(np.array([0, 127, 255], np.uint8))
    np.testing.assert_allclose(x, [-1.0, 127 / 127.5 - 1, 1.0])
    a = flip_mask(3, 10, 64)
    np.testing.assert_array_equal(a, flip_mask(3, 10, 64))  # deterministic in (seed, step)
    assert not np.array_equal(a, flip_mask(3, 11, 64)) and not np.array_equal(a, flip_mask(4, 10, 64))
    assert 16 < a.sum() < 48
