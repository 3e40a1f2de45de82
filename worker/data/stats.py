"""Per-map statistics: where a saliency map puts its mass. numpy only, computed next to each map.

For s = |map| (channels reduced by max-abs first) and p = s / sum(s):

=====================  =============================================================
``mass``               sum(s)
``entropy``            -sum(p log p); ``entropy_norm`` = entropy / log(H*W)
``gini``               Gini coefficient of p (0 = uniform, -> 1 = one pixel)
``top5_mass``          share of the mass in the top 5 % pixels
``com_y``, ``com_x``   centre of mass, in [0, 1] of the height / width
``spread``             sqrt(sum p * squared distance to the centre of mass), same units
``border_mass``        share of the mass in the outer 10 % frame;
``border_enrichment``  border_mass / (the frame's share of the area): > 1 means border-heavy
``q_tl q_tr q_bl q_br`` mass share of each quadrant
=====================  =============================================================

With a ground-truth mask (boolean H x W at the map's size):

=====================  =============================================================
``energy_in_mask``     sum(s inside) / sum(s)  (energy pointing game)
``pointing_hit``       the argmax lies inside the mask dilated by ``tolerance`` pixels
``mass_accuracy``      positive mass inside / positive mass (relevance mass accuracy)
``rank_accuracy``      share of the top-K pixels inside, K = mask size
``topk_iou``           IoU of the top-K pixels with the mask
=====================  =============================================================

Pixels tied at the K-th largest value (the zeros of a sparse map) share the top-K places left to them in
proportion: each counts as inside by the share of the tied pixels that are, not by its position.

A map with no mass gets NaN statistics.

Examples:
    >>> m = np.zeros((1, 10, 10)); m[0, 0, 0] = 1.0
    >>> s = map_statistics(m)
    >>> float(s["border_mass"][0]), float(s["q_tl"][0]), float(s["gini"][0]) > 0.98
    (1.0, 1.0, True)
"""

from __future__ import annotations

import numpy as np

STAT_COLUMNS = ("mass", "entropy", "entropy_norm", "gini", "top5_mass", "com_y", "com_x", "spread",
                "border_mass", "border_enrichment", "q_tl", "q_tr", "q_bl", "q_br")
MASK_COLUMNS = ("energy_in_mask", "pointing_hit", "mass_accuracy", "rank_accuracy", "topk_iou")


def magnitude(maps: np.ndarray) -> np.ndarray:
    """|maps| as float64 (N, H, W): channels of (N, H, W, C) reduced by max-abs, NaN as 0."""
    s = np.abs(np.nan_to_num(np.asarray(maps, np.float64)))
    return s.max(axis=-1) if s.ndim == 4 else s


def frame(h: int, w: int, fraction: float = 0.1) -> np.ndarray:
    """Boolean (h, w): the outer ``fraction`` frame (at least one pixel wide)."""
    bh, bw = max(1, int(round(h * fraction))), max(1, int(round(w * fraction)))
    out = np.zeros((h, w), bool)
    out[:bh], out[-bh:], out[:, :bw], out[:, -bw:] = True, True, True, True
    return out


def centre_of_mass(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) centre of mass of (N, H, W) maps that each sum to 1, in [0, 1] of the height / width."""
    n, h, w = p.shape
    return p.sum(2) @ ((np.arange(h) + 0.5) / h), p.sum(1) @ ((np.arange(w) + 0.5) / w)


def border_share(p: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(mass share in the outer ``fraction`` frame, that share over the frame's share of the area) of (N, H, W)
    maps that each sum to 1: an enrichment above 1 means border-heavy."""
    edge = frame(*p.shape[1:], fraction)
    share = p[:, edge].sum(1)
    return share, share / edge.mean()


def map_statistics(maps: np.ndarray, top_fraction: float = 0.05, border_fraction: float = 0.1) -> dict:
    """Statistics of N maps (N, H, W) or (N, H, W, C); each value an array of N floats."""
    s = magnitude(maps)
    n, h, w = s.shape
    flat = s.reshape(n, h * w)
    mass = flat.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = flat / mass[:, None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        entropy = -plogp.sum(1)
        ordered = np.sort(p, axis=1)
        ranks = np.arange(1, h * w + 1)
        gini = ((2 * ranks - h * w - 1) * ordered).sum(1) / (h * w)
        k = max(1, int(round(top_fraction * h * w)))
        top = ordered[:, -k:].sum(1)
        grid = p.reshape(n, h, w)
        ys = (np.arange(h) + 0.5) / h
        xs = (np.arange(w) + 0.5) / w
        cy, cx = centre_of_mass(grid)
        spread = np.sqrt((grid.sum(2) * (ys[None] - cy[:, None]) ** 2).sum(1)
                         + (grid.sum(1) * (xs[None] - cx[:, None]) ** 2).sum(1))  # two-pass: no cancellation
        border, enrichment = border_share(grid, border_fraction)
        top_half, left_half = np.arange(h) < h / 2, np.arange(w) < w / 2
        quads = {name: grid[:, rows][:, :, cols].sum((1, 2)) for name, rows, cols in (
            ("q_tl", top_half, left_half), ("q_tr", top_half, ~left_half),
            ("q_bl", ~top_half, left_half), ("q_br", ~top_half, ~left_half))}
    empty = mass <= 0
    out = {"mass": mass, "entropy": entropy, "entropy_norm": entropy / np.log(h * w), "gini": gini,
           "top5_mass": top, "com_y": cy, "com_x": cx, "spread": spread, "border_mass": border,
           "border_enrichment": enrichment, **quads}
    for key, value in out.items():
        if key != "mass":
            value = np.asarray(value, np.float64)
            value[empty] = np.nan
            out[key] = value
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def mask_statistics(maps: np.ndarray, masks: np.ndarray, tolerance: int = 15) -> dict:
    """Mask metrics of N maps against N boolean masks of the same H x W."""
    s = magnitude(maps)
    masks = np.asarray(masks, bool)
    n, h, w = s.shape
    flat, mflat = s.reshape(n, h * w), masks.reshape(n, h * w)
    out = {key: np.full(n, np.nan, np.float32) for key in MASK_COLUMNS}
    for i in range(n):
        total, area = flat[i].sum(), int(mflat[i].sum())
        if total <= 0 or area == 0:
            continue
        out["energy_in_mask"][i] = flat[i][mflat[i]].sum() / total
        positive = np.clip(flat[i], 0, None)
        out["mass_accuracy"][i] = positive[mflat[i]].sum() / positive.sum()
        peak_y, peak_x = divmod(int(flat[i].argmax()), w)
        my, mx = np.nonzero(masks[i])
        out["pointing_hit"][i] = float(np.min((my - peak_y) ** 2 + (mx - peak_x) ** 2) <= tolerance ** 2)
        threshold = np.partition(flat[i], h * w - area)[h * w - area]  # the K-th largest value
        above, tied = flat[i] > threshold, flat[i] == threshold
        places = area - int(above.sum())  # the tied pixels share these places, none before another
        hits = int((above & mflat[i]).sum()) + places * int((tied & mflat[i]).sum()) / int(tied.sum())
        out["rank_accuracy"][i] = hits / area
        out["topk_iou"][i] = hits / (2 * area - hits)
    return out
