"""Grad-CAM (Selvaraju et al., 2017): where the last convolutional block sees the class.

At the CAM activation A (see :mod:`worker.engine.cam`; ``cam_layer=NAME`` to choose), channel weights are
the spatial mean of the ordinary gradient of the target score; the map is ReLU(sum_c weight_c A_c),
upsampled bilinearly to the model input on the device.  Only the head above A is differentiated, so it costs
less than any input-gradient method.  The map has one channel.

Example (a functional model, its CAM layer named):
    >>> import numpy as np, keras
    >>> from worker import GradCAM
    >>> x = keras.Input((8, 8, 3))
    >>> features = keras.layers.ReLU(name="features")(keras.layers.Conv2D(4, 3)(x))
    >>> model = keras.Model(x, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(features)))
    >>> cam = GradCAM(model, batch_size=2, map_dtype="float32", cam_layer="features")
    >>> cam.explain(np.zeros((3, 8, 8, 3), np.uint8)).maps.shape, "features" in cam.report["cam_tensor"]
    ((3, 1, 8, 8), True)
"""

from __future__ import annotations


from worker.engine.cam import find_activation, grad_cam
from worker.engine.methods.base import Attribution


class GradCAM(Attribution):
    method = "gradcam"
    requires_relu = False
    map_channels = 1

    def _maps(self, x, scores, forward_ops, found):
        activation = find_activation(forward_ops, self.cam_layer)
        found["cam"] = activation.op.name
        size = self.source.input_size
        return [grad_cam(activation, scores[:, k], size)[..., None] for k in range(scores.shape[1])]
