"""Lower-precision compute kept honest: the score's loss scale, the checks of each map, the fidelity to float32.

**Loss scale.** Under ``precision='float16'`` the backward pass runs in float16, whose smallest value is 6e-8:
the input gradient of a deep model falls below it and the map rounds to exactly zero.  The engine multiplies
the differentiated score by a power of two (as mixed-precision training scales its loss) and divides the
float32 gradient by it again on the device.  The gradient entering the float16 part of the model is the scale
itself (d score / d logit = 1), and float16's largest value is 65504, so the scale starts at 2**15; a pass
whose gradient is not finite is computed again at a quarter of the scale, down to 1, and the scale that
worked is kept (grown back x2 after :data:`GROW_AFTER` finite passes).  bfloat16 has float32's exponent range
and loses mantissa bits instead, which no power of two restores: its scale stays 1.

**Checks.** A map that is exactly zero everywhere although the score depends on the input (in a lower
precision: any zero map, since the forward pass may itself have underflowed to a constant score), or one with a
non-finite value, is not returned as a map: its row gets :func:`zero_map_problem` / :func:`non_finite_problem`.

**Fidelity.** :func:`map_cosines` compares each map with the float32 one; a run below :data:`FIDELITY_BAR`
(the smallest per-map cosine) is warned about.

Examples:
    >>> scale = LossScale("float16"); scale.value
    32768.0
    >>> scale.overflowed(), scale.value
    (True, 8192.0)
    >>> LossScale("bfloat16").value
    1.0
    >>> import numpy as np
    >>> map_cosines(np.array([[[1.0, 0.0]], [[0.0, 0.0]]]), np.array([[[2.0, 0.0]], [[1.0, 0.0]]])).tolist()
    [1.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: float16's first scale: the largest power of two below its largest value (65504)
FLOAT16_SCALE = 2.0 ** 15
#: finite passes after which a lowered scale is doubled again
GROW_AFTER = 64
#: a lower-precision run whose smallest per-map cosine to float32 is below this is warned about
FIDELITY_BAR = 0.99


class LossScale:
    """The power of two the differentiated score is multiplied by, per engine (see the module docstring)."""

    def __init__(self, precision: str):
        self.top = FLOAT16_SCALE if precision == "float16" else 1.0
        self.value = self.top
        self._finite = 0

    def overflowed(self) -> bool:
        """A pass at this scale was not finite: lower the scale; whether a lower one is left to try."""
        self._finite = 0
        if self.value <= 1.0:
            return False
        self.value = max(1.0, self.value / 4)
        return True

    def passed(self) -> None:
        """A pass at this scale was finite: after :data:`GROW_AFTER` of them, try twice the scale."""
        self._finite += 1
        if self._finite >= GROW_AFTER and self.value < self.top:
            self.value, self._finite = min(self.top, self.value * 2), 0


def non_finite_problem(precision: str) -> str:
    if precision == "float32":
        return ("map has non-finite values: the model's gradient is NaN or infinite for this image; check the "
                "image, the preprocessing and the model's weights")
    return (f"map has non-finite values: the backward pass overflowed in {precision} even unscaled; run with "
            "precision='float32'")


def zero_map_problem(precision: str, method: str) -> str:
    gated = f"no gradient reaches the input through {method}'s rules"
    if precision != "float32":
        return (f"map is exactly zero: the forward or backward pass underflowed in {precision}, or {gated}; run "
                "with precision='float32', and if it stays zero, try method='gradient'")
    return (f"map is exactly zero although the score depends on the input: {gated}; try method='gradient' or "
            "activations='all'")


@dataclass(frozen=True)
class Fidelity:
    """How close a lower-precision run's maps are to float32's: per-map cosines of the first batch."""

    precision: str
    maps: int
    cosine_min: float
    cosine_median: float
    bar: float = FIDELITY_BAR

    @classmethod
    def of(cls, precision: str, cosines) -> "Fidelity":
        cosines = np.asarray(cosines, np.float64).reshape(-1)
        if not len(cosines):
            return cls(precision, 0, float("nan"), float("nan"))
        return cls(precision, len(cosines), round(float(cosines.min()), 6), round(float(np.median(cosines)), 6))

    @property
    def below_bar(self) -> bool:
        return bool(self.maps) and self.cosine_min < self.bar

    def line(self) -> str:
        """``fidelity of float16 to float32: cosine min 0.9871, median 0.9990 over 16 maps (first batch)``"""
        return (f"fidelity of {self.precision} to float32: cosine min {self.cosine_min:.4f}, median "
                f"{self.cosine_median:.4f} over {self.maps} maps (first batch)")

    def warning(self) -> str | None:
        if not self.below_bar:
            return None
        return (f"warning: {self.precision} maps differ from float32's (smallest cosine {self.cosine_min:.4f}, "
                f"below {self.bar}); run with precision='float32' for maps you can trust for this model")


def map_cosines(maps, reference) -> np.ndarray:
    """Cosine similarity of each of M maps (M, ...) with its ``reference`` -> (M,): 1 where both are zero, 0 where
    one is, or where either has a non-finite value."""
    a = np.asarray(maps, np.float64).reshape(len(maps), -1)
    b = np.asarray(reference, np.float64).reshape(a.shape)
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a, b = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(na * nb > 0, (a * b).sum(axis=1) / (na * nb), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return np.where(finite, cos, 0.0)
