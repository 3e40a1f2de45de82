"""Class activation maps: find the layer Grad-CAM looks at in a traced graph, and compute the map there.

The layer is found among the ops the forward pass created, so it works alike for Keras models, nested models
and SavedModels: by default the last 4-D float activation with a spatial size above 1 (the last convolutional
block, just before global pooling or flatten); with ``cam_layer=NAME`` the last such activation inside the
layer (or name scope) ``NAME``.

Grad-CAM (Selvaraju et al., 2017): at that activation A (h x w x c), the channel weights are the spatial mean
of the *ordinary* gradient of the score; the map is ReLU(sum_c weight_c A_c), upsampled bilinearly to the model
input on the device (half-pixel centres, as ``tf.image.resize``), as two small matrix products: XLA's own
bilinear resize is wrong for odd whole upscale factors (4 -> 12, 7 -> 49: off by up to 90 % of the map's peak
on TensorFlow 2.21), and XLA is the GPU's default path.
"""

from __future__ import annotations

import re

import tensorflow as tf

from worker.engine.ops import plain_relu_gradients


def _in_scope(op_name: str, layer: str) -> bool:
    """Whether ``layer`` names one of the op's scopes (Keras adds ``_1``, ``_2`` to a scope called again)."""
    parts = op_name.split("/")[:-1]
    return layer in parts or any(re.fullmatch(re.escape(layer) + r"_\d+", p) for p in parts)


def find_activation(ops, layer: str | None = None) -> tf.Tensor:
    """The activation Grad-CAM uses among ``ops`` (a forward pass's ops, in the order they were created)."""
    candidates = [op.outputs[0] for op in ops
                  if op.outputs and op.outputs[0].dtype.is_floating and op.outputs[0].shape.rank == 4
                  and op.type not in ("Const", "Placeholder", "VariableV2", "ReadVariableOp")
                  and (op.outputs[0].shape[1] or 0) > 1 and (op.outputs[0].shape[2] or 0) > 1]
    if layer is not None:
        exact = [t for t in candidates if layer in t.op.name.split("/")[:-1]]
        candidates = exact or [t for t in candidates if _in_scope(t.op.name, layer)]
        if not candidates:
            raise ValueError(f"cam_layer {layer!r}: no 4-D activation with a spatial size above 1 was traced "
                             "inside a layer or scope of that name")
    elif not candidates:
        raise ValueError("Grad-CAM needs a convolutional activation: this model traced none with a spatial size "
                         "above 1")
    return candidates[-1]


def grad_cam(activation: tf.Tensor, score: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """(rows, H, W) float32 Grad-CAM of the summed ``score`` (one per row) at ``activation``, upsampled."""
    with plain_relu_gradients():
        grads = tf.gradients(tf.reduce_sum(score), activation)[0]
    a, g = tf.cast(activation, tf.float32), tf.cast(grads, tf.float32)
    weights = tf.reduce_mean(g, axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(a * weights, axis=-1))
    rows, cols = (_bilinear(n_in, n_out) for n_in, n_out in zip(cam.shape[1:3], size))
    return tf.einsum("yh,nhw,xw->nyx", rows, cam, cols)


def _bilinear(n_in: int, n_out: int) -> tf.Tensor:
    """(n_out, n_in) weights of bilinear interpolation with half-pixel centres, edges clamped."""
    import numpy as np

    position = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), low), 1 - (position - low))
    np.add.at(weights, (np.arange(n_out), high), position - low)
    return tf.constant(weights)
