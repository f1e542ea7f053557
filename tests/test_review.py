"""The review helpers: probability heat map and window / level on display values (``brainseg.display.review``)."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.display.review import display_window, heatmap, probability_u8, window_level


def test_probability_heat_map_runs_from_black_to_yellow():
    prob = probability_u8(np.array([[0.0, 0.5, 1.0, 1.7]]))
    assert prob.tolist() == [[0, 128, 255, 255]]
    rgb = heatmap(prob)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].max() < 10, "0 is black"
    r, g, b = rgb[0, 2].astype(int)
    assert r > 230 and g > 230 and b < 180, "1 is yellow (inferno)"


def test_window_level_in_the_inputs_units():
    # The display was windowed from input values [100, 1100] to 0..255 on every channel.
    window = display_window((np.array([100.0, 100.0, 100.0]), np.array([1100.0, 1100.0, 1100.0])))
    display = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    same = window_level(display, window, center=600.0, width=1000.0)
    assert np.abs(same.astype(int) - display.astype(int)).max() <= 1, "the display's own window changes nothing"
    upper = window_level(display, window, center=850.0, width=500.0, channels=(1,))  # input 600..1100 -> display 127.5..255
    assert upper[0, 127, 1] == 0 and upper[0, 255, 1] == 255 and upper[0, 191, 1] in (127, 128)
    assert np.array_equal(upper[..., 0], display[..., 0]), "other channels untouched"
    assert display_window(None) == {"low": [0.0, 0.0, 0.0], "high": [255.0, 255.0, 255.0]}
    with pytest.raises(ValueError):
        window_level(display, window, center=1.0, width=0.0)


def test_the_result_store_keeps_probabilities_and_the_dicom_seg(tmp_path):
    from brainseg.serving.store import ResultStore, StoredResult

    rng = np.random.default_rng(0)
    display = rng.integers(0, 255, (3, 20, 24, 3), dtype=np.uint8)
    mask = rng.random((3, 20, 24)) > 0.7
    prob = rng.integers(0, 255, (3, 20, 24), dtype=np.uint8)
    store = ResultStore(tmp_path)
    with_both = StoredResult("volume", display, mask, {"kind": "volume"}, affine=np.eye(4), prob=prob, seg_dicom=b"\0" * 128 + b"DICM seg")
    plain = StoredResult("volume", display, mask, {"kind": "volume"}, affine=np.eye(4))
    store.put(with_both)
    store.put(plain)
    back = store.get(with_both.id)
    assert np.array_equal(back.prob[2], prob[2]) and np.array_equal(np.asarray(back.prob), prob)
    assert back.dicom_seg() == b"\0" * 128 + b"DICM seg"
    other = store.get(plain.id)
    assert other.prob is None and other.dicom_seg() is None
    with pytest.raises(ValueError, match="prob must be"):
        store.put(StoredResult("volume", display, mask, {}, prob=prob[:2]))
