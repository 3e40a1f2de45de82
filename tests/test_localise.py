"""Where to intervene: a class's regions, and its SpRAy clusters' when the class's mean dilutes them."""

import numpy as np

from worker.audit.localise import candidates, overlap, regions

GRID = 16


def _grid(**cells):
    """A 16 x 16 mean map, L1-normalised, with a faint floor and the given cells hot: name=(y, x, value)."""
    grid = np.full((GRID, GRID), 0.01)
    for y, x, value in cells.values():
        grid[y, x] = value
    return grid / grid.sum()


def _groups():
    """Class 0: most images look at the centre; a fifth (cluster 1) at a mark in the top-right corner, which
    the class's mean shows at a fifth of the centre's strength -- under the regions' half-peak threshold."""
    centre, mark = _grid(c=(8, 8, 1.0)), _grid(m=(1, 14, 1.0))
    groups = {"true:0": {"count": 100, "mean_map": 0.8 * centre + 0.2 * mark}}
    for cls in (1, 2):
        groups[f"true:{cls}"] = {"count": 100, "mean_map": _grid(o=(12, 3 + cls, 1.0))}
    clusters = [{"cluster": 0, "count": 80, "share": 0.8, "mean_map": centre},
                {"cluster": 1, "count": 20, "share": 0.2, "mean_map": mark}]
    return groups, clusters


def _holds(box, y, x):
    return box[0] * GRID <= y < box[2] * GRID and box[1] * GRID <= x < box[3] * GRID


def test_a_mark_on_part_of_a_class_is_found_through_its_cluster():
    groups, clusters = _groups()
    from worker.audit.localise import contrast

    own = regions(contrast(groups, "true:0"))
    assert own and not any(_holds(r["box"], 1, 14) for r in own)  # the class's mean alone misses the mark
    found = candidates(groups, "true:0", clusters)
    by_cluster = [(c, r["box"]) for c, r in found if c is not None]
    assert [c for c, _ in by_cluster] == [1]  # the centre cluster repeats the class's region: not again
    assert _holds(by_cluster[0][1], 1, 14)
    assert found[0][0] is None and _holds(found[0][1]["box"], 8, 8)  # the class's own region comes first


def test_small_clusters_and_single_clusters_add_nothing():
    groups, clusters = _groups()
    small = [{**c, "share": 0.05} if c["cluster"] == 1 else c for c in clusters]
    assert all(c is None for c, _ in candidates(groups, "true:0", small))
    assert all(c is None for c, _ in candidates(groups, "true:0", clusters[:1]))
    assert all(c is None for c, _ in candidates(groups, "true:0", None))


def test_overlap_is_intersection_over_union():
    assert overlap((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert overlap((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert abs(overlap((0, 0, 0.5, 0.5), (0, 0.25, 0.5, 0.75)) - 1 / 3) < 1e-12
