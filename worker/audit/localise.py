"""Where a class's maps concentrate compared with the rest of the dataset: regions to intervene on.

The contrast of a class is its mean map (16 x 16, each map L1-normalised) minus the count-weighted mean map of
every other class.  Cells at or above half the contrast's peak form 4-connected regions; each region is a box
in [0, 1] image fractions, one cell wider on every side (a map's mass spreads past what the model reads, and a
half-neutralised mark still works), with the share of the class's positive contrast it holds.  A mark of ~1 %
of the image area covers one to four cells, so it is found.  Each SpRAy cluster of a class (a sub-population
whose maps look alike) is localised the same way, from the cluster's mean map: a mark on a part of a class
shows there when the class's mean dilutes it (:func:`candidates`).

Examples:
    >>> grid = np.zeros((16, 16)); grid[0:2, 14:16] = 1.0
    >>> [r["box"] for r in regions(grid)]
    [(0.0, 0.8125, 0.1875, 1.0)]
"""

from __future__ import annotations

import numpy as np

from worker.audit.aggregate import Group

PEAK_FRACTION = 0.5  # a cell belongs to a region at this fraction of the contrast's peak or above
MAX_REGIONS = 2  # per class, the strongest
MARGIN_CELLS = 1  # a region's box grows by this many cells on every side


def contrast(groups: dict, key: Group, mean_map: np.ndarray | None = None) -> np.ndarray:
    """A group's (``groups``: {Group: GroupSummary}) mean map (or ``mean_map``, e.g. one of its SpRAy clusters') minus the count-weighted mean map
    of the other groups of its kind."""
    own = groups[key].mean_map if mean_map is None else mean_map
    others = [(v.count, v.mean_map) for g, v in groups.items()
              if isinstance(g, Group) and g.kind == key.kind and g != key and v.count]
    if not others:
        return np.zeros_like(own)
    total = sum(n for n, _ in others)
    return own - sum(n * m for n, m in others) / total


def regions(grid: np.ndarray, peak_fraction: float = PEAK_FRACTION, most: int = MAX_REGIONS,
            margin: int = MARGIN_CELLS) -> list[dict]:
    """4-connected regions (:func:`scipy.ndimage.label`) of ``grid`` at or above ``peak_fraction`` of its
    (positive) peak, strongest first:
    {"box": (y0, x0, y1, x1) in [0, 1], "cells", "share" of the positive contrast}."""
    positive = np.clip(grid, 0, None)
    peak = positive.max()
    if peak <= 0:
        return []
    from scipy import ndimage

    labelled, count = ndimage.label(positive >= peak_fraction * peak)  # 4-connected (the cross structure)
    found = []
    h, w = grid.shape
    for index in range(1, count + 1):
        ys, xs = np.nonzero(labelled == index)
        y0, x0 = max(0, ys.min() - margin), max(0, xs.min() - margin)
        y1, x1 = min(h, ys.max() + 1 + margin), min(w, xs.max() + 1 + margin)
        found.append({"box": (y0 / h, x0 / w, y1 / h, x1 / w),
                      "cells": len(ys), "share": float(positive[ys, xs].sum() / positive.sum())})
    found.sort(key=lambda r: -r["share"])
    return [{**r, "box": tuple(float(v) for v in r["box"])} for r in found[:most]]


def overlap(a: tuple, b: tuple) -> float:
    """Intersection over union of two (y0, x0, y1, x1) boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def candidates(groups: dict, key: Group, clusters: list | None = None, min_share: float = 0.1,
               same: float = 0.5) -> list[tuple[int | None, dict]]:
    """The regions to probe for a group: ``(None, region)`` for the group's own, then ``(cluster, region)`` for
    each SpRAy cluster holding at least ``min_share`` of the group, for its regions that overlap none found
    before by ``same`` (IoU) or more. A mark on a third of a class's images is diluted in the class's mean map;
    its cluster's mean map shows it."""
    found = [(None, r) for r in regions(contrast(groups, key))]
    for c in clusters if clusters and len(clusters) > 1 else []:
        if c.share < min_share:
            continue
        for r in regions(contrast(groups, key, c.mean_map)):
            if all(overlap(r["box"], seen["box"]) < same for _, seen in found):
                found.append((c.cluster, r))
    return found


def pixel_box(box: tuple, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A [0, 1] box as pixel bounds (y0, x0, y1, x1) of an image of ``size`` (at least one pixel each way)."""
    h, w = size
    y0, x0 = int(np.floor(box[0] * h)), int(np.floor(box[1] * w))
    y1, x1 = max(y0 + 1, int(np.ceil(box[2] * h))), max(x0 + 1, int(np.ceil(box[3] * w)))
    return y0, x0, y1, x1
