"""The one colour map for pictures of saliency: black -> red -> yellow -> white ("hot")."""

from __future__ import annotations

import numpy as np


def hot(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Non-negative values -> uint8 RGB; ``vmax`` (default: the array's own max) maps to white."""
    v = np.nan_to_num(np.asarray(values, np.float64))
    top = v.max() if vmax is None else vmax
    s = np.clip(v / top, 0, 1) if top > 0 else np.zeros_like(v)
    rgb = np.stack([np.clip(3 * s, 0, 1), np.clip(3 * s - 1, 0, 1), np.clip(3 * s - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)
