"""Reduction of (N, H, W, C) maps on the device, so only what is kept crosses to the host.

Example:
    >>> import tensorflow as tf
    >>> reduce_map(tf.constant([[[[1.0, -3.0]]]]), "max_abs", "float32").numpy().tolist()
    [[[3.0]]]
"""

from __future__ import annotations

import tensorflow as tf

REDUCTIONS = ("max_abs", "sum_abs", "l2", "none")
MAP_DTYPES = ("float16", "float32")


def check(reduction: str, dtype: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if dtype not in MAP_DTYPES:
        raise ValueError(f"unknown map dtype {dtype!r}; choose one of {MAP_DTYPES}")


def reduce_map(grads: tf.Tensor, reduction: str, dtype: str) -> tf.Tensor:
    """float32 (..., H, W, C) -> (..., H, W) reduced over channels, or unchanged for 'none'."""
    check(reduction, dtype)
    if reduction == "max_abs":
        out = tf.reduce_max(tf.abs(grads), axis=-1)
    elif reduction == "sum_abs":
        out = tf.reduce_sum(tf.abs(grads), axis=-1)
    elif reduction == "l2":
        out = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=-1))
    else:
        out = grads
    return tf.cast(out, dtype)
