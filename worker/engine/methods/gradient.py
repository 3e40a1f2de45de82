"""Plain gradient saliency (Simonyan et al., 2013): the control guided backprop is compared to.

Examples:
    >>> import numpy as np, keras
    >>> from worker import Gradient
    >>> model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    >>> Gradient(model, batch_size=1).explain(np.ones((1, 4, 4, 3), np.uint8)).maps.shape
    (1, 1, 4, 4)
"""

from __future__ import annotations

from worker.engine.methods.base import Attribution


class Gradient(Attribution):
    method = "gradient"
    requires_relu = False

