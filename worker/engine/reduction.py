"""Reduction of (N, H, W, C) maps on the device, so only what is kept crosses to the host.

float16 maps are stored *normalised*: each map is divided by its largest magnitude
(kept as a float32 ``scale``) before the cast, so float16's 11-bit mantissa is spent
relative to the map itself.  Raw gradients are often far below float16's normal
range (6e-5; random-weight MobileNetV2 gives 1e-13) and would round to zero.
The true map is ``maps * scale``.

Examples:
    >>> import tensorflow as tf
    >>> maps, scale = reduce_map(tf.constant([[[[1.0, -3.0]]]]), "max_abs", "float16")
    >>> maps.numpy().tolist(), scale.numpy().tolist()
    ([[[1.0]]], [3.0])
"""

from __future__ import annotations

import tensorflow as tf

from worker.engine.options import check_choices


def reduce_map(grads: tf.Tensor, reduction: str, dtype: str) -> tuple[tf.Tensor, tf.Tensor]:
    """float32 (..., H, W, C) -> ((..., H, W) reduced over channels or unchanged for 'none', scale (...,))."""
    check_choices(reduction=reduction, map_dtype=dtype)
    if reduction == "max_abs":
        out = tf.reduce_max(tf.abs(grads), axis=-1)
    elif reduction == "sum_abs":
        out = tf.reduce_sum(tf.abs(grads), axis=-1)
    elif reduction == "l2":
        out = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=-1))
    else:
        out = grads
    axes = [-1, -2] if reduction != "none" else [-1, -2, -3]
    if dtype == "float32":
        return out, tf.ones(tf.shape(out)[:-len(axes)], tf.float32)
    peak = tf.reduce_max(tf.abs(out), axis=axes)
    scale = tf.where(peak > 0, peak, tf.ones_like(peak))
    return tf.cast(out / tf.reshape(scale, tf.concat([tf.shape(scale), tf.ones([len(axes)], tf.int32)], 0)),
                   tf.float16), scale
