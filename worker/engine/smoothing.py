"""SmoothGrad (Smilkov et al., 2017) inside the compiled function: noisy copies of each image in its pass.

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
    >>> later = noisy_copies(x, images, n=2, noise=0.1, first=1)  # copies 1 and 2 of each image, drawn alone
    >>> bool(tf.reduce_all(later[1:3] == copies[2:4]))
    True
"""

from __future__ import annotations

import tensorflow as tf


COPY_STRIDE = 7919  # copy j's seed differs from copy 0's by j times this prime


def image_seeds(images: tf.Tensor) -> tf.Tensor:
    """(N, 2) int64 seeds, a checksum of each uint8 image's pixels."""
    flat = tf.cast(tf.reshape(images, [tf.shape(images)[0], -1]), tf.int64)
    position = tf.range(1, tf.shape(flat)[1] + 1, dtype=tf.int64)
    first = tf.reduce_sum(flat * (position % 65521), axis=1) % 2147483647
    second = tf.reduce_sum(flat, axis=1) % 2147483647
    return tf.stack([first, second], axis=1)


def noisy_copies(x: tf.Tensor, images: tf.Tensor, n: int, noise: float, first=0) -> tf.Tensor:
    """(N, H, W, C) model inputs -> (N * (n + 1), H, W, C): per image the clean input, then its noisy copies
    ``first`` .. ``first + n - 1``.  Copy j's noise is drawn from the image's seed moved by j, so a copy is
    the same whichever pass draws it (the engine may split an image's copies over several passes)."""
    span = tf.reduce_max(x, axis=[1, 2, 3]) - tf.reduce_min(x, axis=[1, 2, 3])
    index = tf.cast(first, tf.int64) + tf.range(n, dtype=tf.int64)
    seeds = image_seeds(images)  # (N, 2); copy j's seed: the second half moved by j (pure ops, no RNG op for it)
    seeds = tf.stack([tf.repeat(seeds[:, 0], n), tf.reshape(
        (seeds[:, 1:] + (index[None, :] + 1) * COPY_STRIDE) % 2147483647, [-1])], axis=1)  # (N * n, 2)
    draws = tf.map_fn(lambda seed: tf.random.stateless_normal(tf.shape(x)[1:], seed=seed, dtype=x.dtype),
                      seeds, fn_output_signature=x.dtype)  # (N * n, H, W, C)
    noisy = x[:, None] + tf.cast(noise, x.dtype) * span[:, None, None, None, None] * tf.reshape(
        draws, tf.concat([[-1, n], tf.shape(x)[1:]], 0))
    return tf.reshape(tf.concat([x[:, None], noisy], axis=1), tf.concat([[-1], tf.shape(x)[1:]], 0))
