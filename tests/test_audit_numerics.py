"""The audit's statistics against the libraries that define them, on the maps the audit sees: sparse (many exact
zeros, as ReLU-gated guided maps and a ReLU'd Grad-CAM), tied (float16-quantised), constant, and one class."""

import numpy as np
import pyarrow as pa
import pytest
import scipy.ndimage
import scipy.stats
from skimage.measure import label as skimage_label
from skimage.metrics import structural_similarity

from worker.audit.aggregate import Group, Moments, merge_partials, partial_aggregates
from worker.audit.clusters import affinity, spectral_clusters
from worker.audit.controls import sobel_edges, spearman, ssim
from worker.audit.intervene import bootstrap_interval
from worker.audit.localise import regions
from worker.data.schema import map_column
from worker.data.stats import map_statistics, mask_statistics

SIDE = 24


def sparse(rng, n, zeros, side=SIDE):
    """``n`` maps with a ``zeros`` share of exact zeros, the rest float16 (so tied too)."""
    maps = rng.gamma(0.5, size=(n, side, side)) * (rng.random((n, side, side)) >= zeros)
    return maps.astype(np.float16).astype(np.float64)


def maps_seen(rng, n=40, side=SIDE):
    """The kinds of maps the audit sees, ``n`` of each, stacked: sparse at 50 / 80 / 95 % zeros, quantised to
    16 levels, constant (all zero, all equal) and one lit pixel."""
    constant = np.zeros((n, side, side))
    constant[n // 2:] = 0.25
    one = np.zeros((n, side, side))
    one[np.arange(n), rng.integers(0, side, n), rng.integers(0, side, n)] = 1.0
    quantised = np.round(rng.random((n, side, side)) * 15) / 15
    return np.concatenate([sparse(rng, n, z, side) for z in (0.5, 0.8, 0.95)] + [quantised, constant, one])


def test_spearman_is_scipys_on_sparse_tied_and_constant_maps():
    rng = np.random.default_rng(0)
    a, b = maps_seen(rng), maps_seen(rng)
    b[:40] = a[:40] * rng.random(a[:40].shape)  # one zero mask, values independent
    ours = spearman(a, b)
    with np.errstate(invalid="ignore"), pytest.warns(scipy.stats.ConstantInputWarning):
        theirs = np.array([scipy.stats.spearmanr(np.abs(x).ravel(), np.abs(y).ravel())[0] for x, y in zip(a, b)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(ours[160:200]).all()  # a constant map has no rank order
    # independent sparse maps are uncorrelated whatever their zeros; one shared zero mask is most of the order
    assert np.abs(spearman(sparse(rng, 100, 0.95), sparse(rng, 100, 0.95)).mean()) < 0.02
    assert spearman(a[:40], b[:40]).mean() > 0.9


def test_ssim_is_skimages_on_maps_scaled_to_their_max():
    rng = np.random.default_rng(1)
    a, b = maps_seen(rng, 10, 16), maps_seen(rng, 10, 16)
    top_a, top_b = a.reshape(len(a), -1).max(1), b.reshape(len(b), -1).max(1)
    theirs = [structural_similarity(x / tx if tx else x, y / ty if ty else y, win_size=7, data_range=1.0)
              for x, y, tx, ty in zip(a, b, top_a, top_b)]
    np.testing.assert_allclose(ssim(a, b), theirs, rtol=1e-12)
    np.testing.assert_allclose(ssim(a, a), 1.0)
    assert ssim(a[:2, :6, :6], b[:2, :6, :6]).shape == (2,)  # a window wider than the map: the widest odd one


def test_sobel_is_the_3x3_kernel_with_edges_extended():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    images[0] = 7  # flat: no edge
    grey = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    kernel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    gx, gy = np.zeros_like(grey), np.zeros_like(grey)
    for dy in range(3):
        for dx in range(3):
            window = p[:, dy:dy + grey.shape[1], dx:dx + grey.shape[2]]
            gx += kernel[dy, dx] * window
            gy += kernel.T[dy, dx] * window
    np.testing.assert_allclose(sobel_edges(images), np.hypot(gx, gy), rtol=1e-12, atol=1e-9)
    assert not sobel_edges(images)[0].any()


def test_moments_merge_equals_numpy_in_any_split():
    rng = np.random.default_rng(3)
    values = maps_seen(rng, 20, 8).reshape(-1, 64)
    values = values[rng.permutation(len(values))]
    merged = Moments.of(np.zeros((0, 64)))
    for part in np.array_split(values, [1, 2, 30, 31, 80]):
        merged = merged.merge(Moments.of(part))
    assert merged.count == len(values)
    np.testing.assert_allclose(merged.mean, values.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(merged.variance, values.var(0), rtol=1e-9, atol=1e-15)
    # with missing values, per element (a statistic is NaN on a map with no mass)
    holes = np.where(rng.random(values.shape) < 0.3, np.nan, values)
    holes[:, 0] = np.nan  # an element with no value at all
    found = Moments.of_finite(holes[:50]).merge(Moments.of_finite(holes[50:]))
    np.testing.assert_array_equal(found.count, np.isfinite(holes).sum(0))
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        np.testing.assert_allclose(found.variance, np.nanvar(holes, 0), rtol=1e-9, atol=1e-15, equal_nan=True)


def test_statistics_std_survives_a_large_mean():
    """Merged from blocks, a statistic's std is numpy's even where sum-of-squares loses it all (mass ~1e8, std 1)."""
    rng = np.random.default_rng(4)
    n = 64
    maps = sparse(rng, n, 0.8, 16)
    mass = 1e8 + rng.normal(0, 1, n)
    table = pa.table({"id": [f"r#{i}" for i in range(n)], "label": np.zeros(n, np.int64),
                      "predicted_class": np.zeros(n, np.int64),
                      "map": map_column(maps.astype(np.float16), np.ones(n, bool), maps.shape[1:]),
                      "error": pa.nulls(n, pa.string()), "mass": mass,
                      "entropy": np.where(np.arange(n) % 5 == 0, np.nan, rng.random(n))})
    merged = merge_partials(pa.concat_tables([partial_aggregates(table.slice(a, 16), "label")
                                              for a in range(0, n, 16)]))
    stats = merged[Group("true", 0)].stats
    assert stats["mass"].std == pytest.approx(mass.std(), rel=1e-6)
    assert stats["entropy"].n == n - 13
    assert stats["entropy"].std == pytest.approx(np.nanstd(table["entropy"].to_numpy(zero_copy_only=False)),
                                                    rel=1e-9)


def test_map_statistics_are_the_libraries_on_the_maps_seen():
    rng = np.random.default_rng(5)
    maps = maps_seen(rng, 10, 20)
    found = map_statistics(maps)
    for i, m in enumerate(maps):
        if m.sum() == 0:
            assert np.isnan(found["entropy"][i]) and np.isnan(found["gini"][i])
            continue
        p = m / m.sum()
        assert found["entropy"][i] == pytest.approx(scipy.stats.entropy(m.ravel()), rel=1e-5, abs=1e-6)
        cy, cx = scipy.ndimage.center_of_mass(m)
        assert (found["com_y"][i], found["com_x"][i]) == pytest.approx(((cy + 0.5) / 20, (cx + 0.5) / 20), rel=1e-5)
        ys, xs = np.mgrid[:20, :20]
        var = np.average((ys - cy) ** 2 + (xs - cx) ** 2, weights=m) / 400
        assert found["spread"][i] == pytest.approx(np.sqrt(var), rel=1e-4, abs=1e-6)
        flat = p.ravel()  # Gini as half the relative mean absolute difference
        gini = np.abs(flat[:, None] - flat[None]).sum() / (2 * len(flat) ** 2 * flat.mean())
        assert found["gini"][i] == pytest.approx(gini, rel=1e-4, abs=1e-6)


def test_rank_accuracy_is_the_mean_over_orders_of_the_tied_pixels():
    rng = np.random.default_rng(6)
    maps = sparse(rng, 6, 0.9, 12)
    masks = np.zeros((6, 12, 12), bool)
    masks[:, 3:9, 2:8] = True  # 36 pixels: more than a sparse map's non-zero ones
    found = mask_statistics(maps, masks)
    for i in range(6):
        hits = []
        for _ in range(400):  # break the ties at random, then take the top K by rank
            ranks = scipy.stats.rankdata(maps[i].ravel() + rng.random(144) * 1e-9 * (maps[i].ravel() == 0),
                                         method="ordinal")
            hits.append((ranks > 144 - 36)[masks[i].ravel()].sum())
        assert found["rank_accuracy"][i] == pytest.approx(np.mean(hits) / 36, abs=0.02)


def test_regions_are_the_connected_components():
    rng = np.random.default_rng(7)
    for _ in range(20):
        grid = np.round(rng.random((16, 16)) * 4) / 4  # ties at the threshold
        found = regions(grid, most=100, margin=0)
        parts, count = skimage_label(grid >= 0.5 * grid.max(), connectivity=1, return_num=True)
        assert len(found) == count
        boxes = set()
        for j in range(1, count + 1):
            ys, xs = np.nonzero(parts == j)
            boxes.add((ys.min() / 16, xs.min() / 16, (ys.max() + 1) / 16, (xs.max() + 1) / 16))
        assert {r["box"] for r in found} == boxes
        assert sum(r["share"] for r in found) == pytest.approx(
            grid[grid >= 0.5 * grid.max()].sum() / grid.sum())


def test_spray_finds_groups_of_duplicate_and_empty_maps():
    """A sample with many identical maps (the empty maps of a sparse method, say): the kNN graph keeps its scale
    (distances of distinct neighbours) and the clusters are the planted groups."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(8)
    spot = np.zeros((1, 64))
    spot[0, 60] = 1.0
    x = np.vstack([sparse(rng, 1, 0.8, 8).reshape(1, -1).repeat(40, 0),  # forty identical maps
                   np.zeros((25, 64)),  # twenty-five empty ones
                   spot + 0.05 * sparse(rng, 30, 0.5, 8).reshape(30, -1)])  # and a group that varies
    truth = np.repeat([0, 1, 2], [40, 25, 30])
    found = spectral_clusters(x, seed=0)
    assert found.k == 3 and adjusted_rand_score(found.labels, truth) == 1.0
    graph = affinity(x)
    assert (graph.getnnz(1) >= 10).all() and abs(graph - graph.T).max() == 0
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    rows, cols = graph.nonzero()
    for i in range(len(x)):  # each row's edges reach at least its 10 nearest others (by brute force)
        assert np.sort(d2[i])[9] <= d2[i][cols[rows == i]].max() + 1e-12


def test_bootstrap_interval_on_flips():
    values = np.r_[np.zeros(40), np.ones(8), -np.ones(2)]  # flip differences: mostly 0, a few +-1
    low, high = bootstrap_interval(values)
    rng = np.random.default_rng(99)  # the percentile bootstrap written out, with many more resamples
    means = values[rng.integers(0, len(values), (20000, len(values)))].mean(1)
    # the means move in steps of 1/50: the ends agree to one step
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1 / 50 + 1e-9)
    assert bootstrap_interval(np.zeros(30)) == (0.0, 0.0)
    assert all(np.isnan(bootstrap_interval(np.ones(1))))
