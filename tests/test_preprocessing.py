import numpy as np
import pytest

from brainseg.config import AugmentConfig, PreprocessConfig
from brainseg.preprocessing import build_augmentation, clahe, intensity_window, normalize, preprocess_slice, resize_mask, restore_size, to_uint8


def test_clahe_keeps_shape_dtype_and_spreads_contrast():
    rng = np.random.default_rng(0)
    img = (100 + rng.integers(0, 20, size=(64, 64, 3))).astype(np.uint8)  # a narrow band of grey
    out = clahe(img, clip_limit=4.0, tile_grid=4)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.ptp(out[..., 0]) > np.ptp(img[..., 0])  # contrast was stretched
    with pytest.raises(TypeError):
        clahe(img.astype(np.float32))


def test_clahe_equalises_each_channel_on_its_own_histogram():
    """Hand-computed: one tile and no clipping make CLAHE a histogram equalisation, out = round(255 * CDF(v)).

    A quarter of the pixels at 10 and the rest at 20 gives 10 -> round(63.75) = 64, 20 -> 255; the
    same values in the opposite proportions give 10 -> round(191.25) = 191. A constant channel maps
    to 255. Channels mixed into one histogram would give other numbers.
    """
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0], img[:16, :, 0] = 20, 10
    img[..., 1], img[:16, :, 1] = 10, 20
    img[..., 2] = 50
    out = clahe(img, clip_limit=1000.0, tile_grid=1)
    expected = np.zeros_like(img)
    expected[..., 0], expected[:16, :, 0] = 255, 64
    expected[..., 1], expected[:16, :, 1] = 191, 255
    expected[..., 2] = 255
    assert np.array_equal(out, expected)
    assert np.array_equal(clahe(np.ascontiguousarray(img[..., 1]), clip_limit=1000.0, tile_grid=1), expected[..., 1])  # (H, W) too


def test_to_uint8_passes_uint8_and_windows_others():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert to_uint8(u8) is u8
    f = np.linspace(0, 1000, 100, dtype=np.float32).reshape(10, 10)
    out = to_uint8(f)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([[np.nan, 1.0]], np.float32))


def test_intensity_window_ignores_zero_background():
    vol = np.zeros((10, 10, 3), np.float32)
    vol[2:8, 2:8] = np.linspace(100, 200, 36 * 3).reshape(6, 6, 3)
    lo, hi = intensity_window(vol)
    assert lo.shape == (3,) and (lo == 0).all()  # zero background stays black
    assert (hi > 150).all() and (hi <= 200).all()


def test_normalize_minmax_and_zscore():
    img = np.full((8, 8, 3), 255, np.uint8)
    img[0, 0] = 0
    x = normalize(img, PreprocessConfig(normalization="minmax"))
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert x.max() == 1.0 and x.min() == 0.0
    z = normalize(img, PreprocessConfig(normalization="zscore"))
    assert np.allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    assert np.allclose(z.std(axis=(1, 2)), 1, atol=1e-3)
    with pytest.raises(ValueError, match="normalization"):
        normalize(img, PreprocessConfig(normalization="bogus"))


def test_preprocess_slice_shape_for_any_input_size():
    cfg = PreprocessConfig(input_size=64)
    for shape in [(256, 256, 3), (240, 200, 3), (31, 47, 3)]:
        x = preprocess_slice(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), cfg)
        assert x.shape == (3, 64, 64)
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_mask_resize_and_restore():
    m = np.zeros((256, 256), bool)
    m[100:140, 60:120] = True
    small = resize_mask(m, 128)
    assert small.shape == (128, 128) and small.sum() == pytest.approx(m.sum() / 4, rel=0.05)
    back = restore_size(small.astype(np.float32), 256, 256) >= 0.5
    inter = (back & m).sum()
    assert 2 * inter / (back.sum() + m.sum()) > 0.95


def test_augmentation_keeps_image_and_mask_aligned():
    """The lesion is painted bright in the image; after every transform the mask must cover it."""
    aug = build_augmentation(AugmentConfig(hflip=0.5, vflip=0.5, affine=1.0, elastic=1.0, brightness_contrast=0.0, gamma=0.0, noise=0.0))
    img = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    img[40:70, 50:90] = 255
    mask[40:70, 50:90] = 1
    np.random.seed(0)
    import random

    random.seed(0)
    for _ in range(20):
        out = aug(image=img, mask=mask)
        bright = out["image"][..., 0] > 127
        m = out["mask"].astype(bool)
        assert m.any()
        overlap = (bright & m).sum() / max(1, (bright | m).sum())
        assert overlap > 0.8
