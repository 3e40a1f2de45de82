"""Guided Grad-CAM (Selvaraju et al., 2017): the guided backprop map times the class's Grad-CAM.

One compiled function: the forward pass is traced once with the guided ReLU overrides; the guided map is
its input gradient, and Grad-CAM's channel weights are the *ordinary* gradient of the same score at the
CAM activation (the small head above it is differentiated twice, plainly and guided; the backbone once).
Every ReLU must be guided, as for :class:`~worker.engine.methods.guided_backprop.GuidedBackprop`.

Examples:
    >>> import numpy as np, keras
    >>> from worker import GuidedGradCAM
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
    ...                           keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    >>> GuidedGradCAM(model, batch_size=2).explain(np.zeros((3, 8, 8, 3), np.uint8)).maps.shape
    (3, 1, 8, 8)
"""

from __future__ import annotations


from worker.engine.cam import find_activation, grad_cam
from worker.engine.methods.base import Attribution
from worker.engine.ops import GUIDED_OVERRIDES, GUIDED_UNIT


class GuidedGradCAM(Attribution):
    method = "guided_gradcam"
    requires_relu = True
    gradient_overrides = GUIDED_OVERRIDES
    unit_rule = GUIDED_UNIT

    def _maps(self, x, scores, forward_ops, found):
        activation = find_activation(forward_ops, self.cam_layer)
        found["cam"] = activation.op.name
        activation = found.get("rerouted", {}).get(activation.ref(), activation)  # a unit's output, as re-routed
        guided = super()._maps(x, scores, forward_ops, found)
        size = self.source.input_size
        return [g * grad_cam(activation, scores[:, k], size)[..., None] for k, g in enumerate(guided)]
