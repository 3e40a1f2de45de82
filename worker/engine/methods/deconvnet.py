"""Deconvnet (Zeiler & Fergus, 2014), as a gradient method (Springenberg et al., 2014).

The gradient of a class score with respect to the model input, where at every
ReLU/ReLU6 only *positive* gradients pass back, whatever the forward input was.
Guided backprop adds the forward gate; the plain gradient keeps only that one.
The same override mechanism, coverage report and refusal rules as guided
backprop: every ReLU is reached, or the build names the ones that are not.

Examples:
    >>> import numpy as np, keras
    >>> from worker import Deconvnet
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
    ...                           keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    >>> dcn = Deconvnet(model, batch_size=2, map_dtype="float32")
    >>> dcn.explain(np.zeros((3, 8, 8, 3), np.uint8)).maps.shape, dcn.report["coverage"]["guided_total"]
    ((3, 1, 8, 8), 1)
"""

from __future__ import annotations

from worker.engine.methods.base import Attribution
from worker.engine.ops import DECONV_OVERRIDES, DECONV_UNIT


class Deconvnet(Attribution):
    method = "deconvnet"
    requires_relu = True

    gradient_overrides = DECONV_OVERRIDES
    unit_rule = DECONV_UNIT
