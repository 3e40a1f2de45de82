"""How a batch is split into compiled passes of bounded size: SmoothGrad's copies and top-k's targets.

A pass differentiates ``images x (1 + copies) x targets`` model inputs: each image's clean input (it decides
the prediction and the target) and a slice of its noisy copies, for a slice of its targets (each target is one
backward pass over the same forward pass, counted like one more input).  :func:`plan_passes` keeps that product
within ``bound`` by slicing targets first, then copies, then images; the engine runs the passes one after
another and sums each image's copies on the device, so the maps are those of one big pass.

The bound defaults to the batch size: a job sized so that a plain pass of ``batch_size`` images fits its device
then fits with any number of copies or targets, and its peak memory does not depend on them.

Examples:
    >>> plan_passes(batch_size=16, smooth=50, targets=1, bound=16)
    PassPlan(images=1, copies=13, copy_passes=4, targets=1, target_passes=1)
    >>> plan_passes(batch_size=16, smooth=0, targets=5, bound=16)
    PassPlan(images=3, copies=0, copy_passes=1, targets=5, target_passes=1)
    >>> plan_passes(batch_size=4, smooth=8, targets=1, bound=64).inputs
    36
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PassPlan:
    """One pass: ``images`` images, ``copies`` noisy copies of each (0: no SmoothGrad) and ``targets`` targets;
    an image takes ``copy_passes x target_passes`` passes."""

    images: int
    copies: int
    copy_passes: int
    targets: int
    target_passes: int

    @property
    def inputs(self) -> int:
        """Model inputs differentiated in one pass (a target counted as one input)."""
        return self.images * (1 + self.copies) * self.targets


def _balanced(total: int, most: int) -> int:
    """The slice size that splits ``total`` into as few slices of at most ``most`` as possible, evenly."""
    return math.ceil(total / math.ceil(total / max(1, most)))


def plan_passes(batch_size: int, smooth: int, targets: int, bound: int) -> PassPlan:
    """The passes for ``batch_size`` images with ``smooth`` noisy copies and ``targets`` maps per image, each pass
    at most ``bound`` inputs (one image with one copy and one target when the bound is smaller than that)."""
    if bound < 1:
        raise ValueError(f"pass_images must be >= 1, got {bound}")
    t = _balanced(targets, bound // 2 if smooth else bound)  # SmoothGrad needs 2 inputs: the clean one and a copy
    per_image = max(1, bound // t)
    c = _balanced(smooth, per_image - 1) if smooth else 0
    b = max(1, min(batch_size, per_image // (1 + c)))
    return PassPlan(images=b, copies=c, copy_passes=math.ceil(smooth / c) if c else 1,
                    targets=t, target_passes=math.ceil(targets / t))
