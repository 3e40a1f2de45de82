"""Map statistics and mask metrics against values worked out by hand on tiny maps."""

import math

import numpy as np
import pytest

from worker.data.decode import DecodeError, decode_mask
from worker.data.stats import frame, map_statistics, mask_statistics


def test_uniform_map():
    s = {k: float(v[0]) for k, v in map_statistics(np.ones((1, 4, 4))).items()}
    assert s["mass"] == 16
    assert s["entropy"] == pytest.approx(math.log(16)) and s["entropy_norm"] == pytest.approx(1.0)
    assert s["gini"] == pytest.approx(0.0, abs=1e-7)
    assert s["com_y"] == pytest.approx(0.5) and s["com_x"] == pytest.approx(0.5)
    # 4x4 frame of width 1 (round(0.4) -> at least 1): 12 of 16 pixels
    assert s["border_mass"] == pytest.approx(12 / 16) and s["border_enrichment"] == pytest.approx(1.0)
    assert all(s[q] == pytest.approx(0.25) for q in ("q_tl", "q_tr", "q_bl", "q_br"))
    # spread: variance of pixel centres (1/8, 3/8, 5/8, 7/8) is 5/64 per axis
    assert s["spread"] == pytest.approx(math.sqrt(2 * 5 / 64))
    assert s["top5_mass"] == pytest.approx(1 / 16)  # round(0.05 * 16) = 1 pixel


def test_two_pixel_map_by_hand():
    m = np.zeros((1, 4, 4))
    m[0, 1, 1], m[0, 3, 2] = 3.0, -1.0  # |s|: 3 at (1, 1), 1 at (3, 2)
    s = {k: float(v[0]) for k, v in map_statistics(m).items()}
    p = np.array([0.75, 0.25])
    assert s["mass"] == 4
    assert s["entropy"] == pytest.approx(-(p * np.log(p)).sum())
    # Gini of 14 zeros, 0.25, 0.75 (sorted, n = 16): sum((2i - n - 1) x_i) / n
    assert s["gini"] == pytest.approx(((2 * 15 - 17) * 0.25 + (2 * 16 - 17) * 0.75) / 16)
    assert s["com_y"] == pytest.approx(0.75 * 1.5 / 4 + 0.25 * 3.5 / 4)
    assert s["com_x"] == pytest.approx(0.75 * 1.5 / 4 + 0.25 * 2.5 / 4)
    assert s["border_mass"] == pytest.approx(0.25)  # only (3, 2) lies in the outer frame
    assert s["q_tl"] == pytest.approx(0.75) and s["q_br"] == pytest.approx(0.25)
    assert s["top5_mass"] == pytest.approx(0.75)


def test_empty_map_is_nan_and_channels_reduce():
    s = map_statistics(np.zeros((1, 3, 3)))
    assert s["mass"][0] == 0 and np.isnan(s["entropy"][0]) and np.isnan(s["com_x"][0])
    rgb = np.zeros((1, 3, 3, 3))
    rgb[0, 0, 0, 2] = -2.0
    assert map_statistics(rgb)["mass"][0] == 2.0


def test_frame():
    assert frame(10, 10).sum() == 100 - 64
    assert frame(3, 5).sum() == 15 - 3  # a one-pixel frame around a 1 x 3 interior


def test_mask_metrics_by_hand():
    m = np.zeros((1, 20, 20))
    m[0, 2, 2] = 4.0      # the peak, outside the mask but within 15 px of it
    m[0, 10, 10] = 1.0    # inside
    m[0, 11, 11] = 1.0    # inside
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 10:12, 10:12] = True  # 4 pixels
    s = {k: float(v[0]) for k, v in mask_statistics(m, mask).items()}
    assert s["energy_in_mask"] == pytest.approx(2 / 6) and s["mass_accuracy"] == pytest.approx(2 / 6)
    assert s["pointing_hit"] == 1.0  # distance sqrt(8^2 + 8^2) = 11.3 <= 15
    assert mask_statistics(m, mask, tolerance=5)["pointing_hit"][0] == 0.0
    # top-4 pixels: the 3 non-zero ones (2 inside) and one place shared by the 397 zeros, 2 of them inside
    hits = 2 + 2 / 397
    assert s["rank_accuracy"] == pytest.approx(hits / 4)
    assert s["topk_iou"] == pytest.approx(hits / (8 - hits))


def test_masks_and_boxes_decode():
    box = decode_mask([0.25, 0.5, 0.75, 1.0], (8, 8))
    assert box.sum() == 4 * 4 and box[2:6, 4:8].all()
    image = np.zeros((16, 16), np.uint8)
    image[:8] = 255
    assert decode_mask(image, (4, 4))[:2].all() and not decode_mask(image, (4, 4))[2:].any()
    with pytest.raises(DecodeError, match="not \\[y0, x0, y1, x1\\]"):
        decode_mask([0.5, 0.0, 0.2, 1.0], (8, 8))


def test_a_batch_with_no_maps_gives_empty_columns():
    """A block whose rows all failed still gets every statistics column (empty), not an error."""
    from worker.data.stats import MASK_COLUMNS, STAT_COLUMNS, mask_statistics

    values = {**map_statistics(np.zeros((0, 8, 8))), **mask_statistics(np.zeros((0, 8, 8)), np.zeros((0, 8, 8), bool))}
    assert set(values) == {*STAT_COLUMNS, *MASK_COLUMNS} and all(v.shape == (0,) for v in values.values())
