"""SmoothGrad (Smilkov et al., 2017) inside the compiled function: N noisy copies of each image in one batch.

Each image's copies get Gaussian noise of standard deviation ``noise`` times the span (max - min) of that
image's model input.  The noise is drawn from a seed made of the image's own pixels, so a row's map does not
depend on which rows share its batch, and a re-run gives the same map.  The clean image rides along as copy 0:
it decides the predicted class and the target; the map is the mean over the noisy copies.

Examples:
    >>> import tensorflow as tf
    >>> images = tf.zeros((2, 4, 4, 3), tf.uint8)
    >>> x = tf.cast(images, tf.float32) + tf.reshape(tf.range(48.0), (1, 4, 4, 3))
    >>> copies = noisy_copies(x, images, n=3, noise=0.1)
    >>> copies.shape, bool(tf.reduce_all(copies[0] == x[0])), bool(tf.reduce_all(copies[0] == copies[4]))
    (TensorShape([8, 4, 4, 3]), True, True)
"""

from __future__ import annotations

import tensorflow as tf


def image_seeds(images: tf.Tensor) -> tf.Tensor:
    """(N, 2) int64 seeds, a checksum of each uint8 image's pixels."""
    flat = tf.cast(tf.reshape(images, [tf.shape(images)[0], -1]), tf.int64)
    position = tf.range(1, tf.shape(flat)[1] + 1, dtype=tf.int64)
    first = tf.reduce_sum(flat * (position % 65521), axis=1) % 2147483647
    second = tf.reduce_sum(flat, axis=1) % 2147483647
    return tf.stack([first, second], axis=1)


def noisy_copies(x: tf.Tensor, images: tf.Tensor, n: int, noise: float) -> tf.Tensor:
    """(N, H, W, C) model inputs -> (N * (n + 1), H, W, C): per image the clean input, then ``n`` noisy ones."""
    span = tf.reduce_max(x, axis=[1, 2, 3]) - tf.reduce_min(x, axis=[1, 2, 3])
    shape = tf.concat([[n], tf.shape(x)[1:]], 0)
    draws = tf.map_fn(lambda seed: tf.random.stateless_normal(shape, seed=seed, dtype=x.dtype),
                      image_seeds(images), fn_output_signature=x.dtype)  # (N, n, H, W, C)
    noisy = x[:, None] + tf.cast(noise, x.dtype) * span[:, None, None, None, None] * draws
    return tf.reshape(tf.concat([x[:, None], noisy], axis=1), tf.concat([[-1], tf.shape(x)[1:]], 0))
