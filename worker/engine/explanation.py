"""What an attribution method returns: :class:`Explanation`, numpy only.

Examples:
    >>> e = Explanation.empty(maps_per_image=1, map_shape=(4, 4), map_dtype="float16")
    >>> both = Explanation.concatenate([e, e]); len(both), both.maps.shape
    (0, (0, 1, 4, 4))
    >>> two = Explanation.empty(1, (4, 4), "float32").take([])
    >>> len(two), two.problems.shape
    (0, (0,))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Explanation:
    """Maps and what they explain, for N images and K maps per image.

    maps: (N, K, H, W) reduced or (N, K, H, W, C) full; float32, or float16 normalised per map.
    map_scale: (N, K) float32: the true map is ``maps * map_scale`` (1 for float32), see :meth:`as_float32`.
    predicted_class, predicted_prob: (N,).  target_class, target_score: (N, K);
    target_class is -1 for layer targets.
    problems: (N,) object: why an image's maps are not maps (exactly zero although its score depends on the
    image, or not finite: :mod:`worker.engine.precision`), None where they are; a caller writes it as the row's
    error rather than the map.
    """

    maps: np.ndarray
    map_scale: np.ndarray
    predicted_class: np.ndarray
    predicted_prob: np.ndarray
    target_class: np.ndarray
    target_score: np.ndarray
    report: dict = field(default_factory=dict, repr=False)
    problems: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.problems is None:
            self.problems = np.full(len(self.maps), None, object)

    def __len__(self) -> int:
        return len(self.maps)

    def as_float32(self) -> np.ndarray:
        """The maps at their true scale, float32."""
        scale = self.map_scale.reshape(self.map_scale.shape + (1,) * (self.maps.ndim - 2))
        return self.maps.astype(np.float32) * scale

    @classmethod
    def empty(cls, maps_per_image: int, map_shape: tuple, map_dtype: str, report: dict | None = None):
        """No images: every array with its shape's leading dimension 0."""
        k = maps_per_image
        return cls(np.zeros((0, k, *map_shape), map_dtype), np.zeros((0, k), np.float32), np.zeros(0, np.int32),
                   np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), report or {})

    def take(self, rows) -> "Explanation":
        """The Explanation of ``rows`` (indices or a boolean mask) only."""
        arrays = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self) if f.name != "report"}
        return type(self)(**arrays, report=self.report)

    @classmethod
    def concatenate(cls, parts: list["Explanation"]) -> "Explanation":
        """One Explanation of the images of ``parts`` in order (the report of the first)."""
        arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(cls) if f.name != "report"}
        return cls(**arrays, report=parts[0].report)
