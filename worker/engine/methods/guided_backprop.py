"""Guided Backpropagation (Springenberg et al., 2014).

The gradient of a class score with respect to the model input, where at every
ReLU the backward signal passes only where the forward input was positive and
the incoming gradient is positive (for ReLU6: where 0 < x < 6).  Every ReLU of
the model is guided -- in nested models, ``ReLU`` layers, ``Lambda`` and custom
layers and SavedModels -- or the build fails and names the ones that could not
be (``relu_policy="warn"`` turns that into a warning).

Examples:
    >>> import numpy as np, keras
    >>> from worker import GuidedBackprop
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
    ...                           keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
    >>> gbp = GuidedBackprop(model, batch_size=2, preprocessing="scale01", map_dtype="float32")
    >>> out = gbp.explain(np.zeros((3, 8, 8, 3), np.uint8))
    >>> out.maps.shape, gbp.report["coverage"]["guided_total"], gbp.report["score"]
    ((3, 1, 8, 8), 1, 'logits (final softmax stripped)')
"""

from __future__ import annotations

from worker.engine.methods.base import Attribution
from worker.engine.ops import GUIDED_OVERRIDES, GUIDED_UNIT


class GuidedBackprop(Attribution):
    method = "guided_backprop"
    requires_relu = True

    gradient_overrides = GUIDED_OVERRIDES
    unit_rule = GUIDED_UNIT
