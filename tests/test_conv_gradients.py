"""The forward-kernel convolution gradients (worker.engine.ops.FORWARD_CONV_GRADIENTS) against TensorFlow's own
backprop kernels, for every geometry: each path that takes the forward kernels and each that falls back.

TensorFlow has no CPU gradient for grouped or dilated ``Conv2D`` ops; there the reference is the framework's
gradient of an equivalent formulation (one convolution per group; ``tf.nn.convolution``'s space-to-batch).
"""

import numpy as np
import pytest
import tensorflow as tf

from worker.engine.ops import FORWARD_CONV_GRADIENTS, gradient_scope

rng = np.random.default_rng(0)

# (name, input shape, forward op on x) - covers stride 1 SAME/VALID, odd and even kernels, 1x1 with stride 2
# and 3 (input sizes that do not divide), strided 3x3 (framework fallback), grouped, dilated, and depthwise
# with multiplier 1 / 2 and stride 1 / 2.
W = {k: tf.constant(rng.standard_normal(s), tf.float32) for k, s in {
    "k3": (3, 3, 4, 6), "k1": (1, 1, 4, 6), "k5": (5, 5, 4, 3), "k2": (2, 2, 4, 5), "g2": (3, 3, 2, 6),
    "dw": (3, 3, 4, 1), "dw2": (3, 3, 4, 2), "dw5": (5, 5, 4, 1), "s6": (1, 1, 1, 6), "s4": (1, 1, 1, 4)}.items()}
CASES = [
    ("3x3 same", lambda x: tf.nn.conv2d(x, W["k3"], 1, "SAME")),
    ("3x3 valid", lambda x: tf.nn.conv2d(x, W["k3"], 1, "VALID")),
    ("5x5 valid", lambda x: tf.nn.conv2d(x, W["k5"], 1, "VALID")),
    ("2x2 same (even: framework)", lambda x: tf.nn.conv2d(x, W["k2"], 1, "SAME")),
    ("1x1", lambda x: tf.nn.conv2d(x, W["k1"], 1, "SAME")),
    ("1x1 stride 2 valid", lambda x: tf.nn.conv2d(x, W["k1"], 2, "VALID")),
    ("1x1 stride 2 same", lambda x: tf.nn.conv2d(x, W["k1"], 2, "SAME")),
    ("1x1 stride 3", lambda x: tf.nn.conv2d(x, W["k1"], 3, "VALID")),
    ("3x3 stride 2 (framework)", lambda x: tf.nn.conv2d(x, W["k3"], 2, "SAME")),
    ("3x3 dilated same", lambda x: tf.nn.conv2d(x, W["k3"], 1, "SAME", dilations=2)),
    ("3x3 dilated valid", lambda x: tf.nn.conv2d(x, W["k3"], 1, "VALID", dilations=2)),
    ("grouped", lambda x: tf.nn.conv2d(x, W["g2"], 1, "SAME")),
    # a per-channel scale after the convolution (BatchNorm's backward pass) is folded into the kernel
    ("3x3 then channel scale", lambda x: tf.nn.conv2d(x, W["k3"], 1, "SAME") * W["s6"]),
    ("1x1 stride 2 then channel scale", lambda x: W["s6"] * tf.nn.conv2d(x, W["k1"], 2, "VALID")),
    ("depthwise then channel scale", lambda x: tf.nn.depthwise_conv2d(x, W["dw"], [1, 1, 1, 1], "SAME") * W["s4"]),
    ("depthwise dilated", lambda x: tf.nn.depthwise_conv2d(x, W["dw"], [1, 1, 1, 1], "SAME", dilations=[2, 2])),
    ("depthwise same", lambda x: tf.nn.depthwise_conv2d(x, W["dw"], [1, 1, 1, 1], "SAME")),
    ("depthwise 5x5 valid", lambda x: tf.nn.depthwise_conv2d(x, W["dw5"], [1, 1, 1, 1], "VALID")),
    ("depthwise stride 2 (framework)", lambda x: tf.nn.depthwise_conv2d(x, W["dw"], [1, 2, 2, 1], "SAME")),
    ("depthwise multiplier 2 (framework)", lambda x: tf.nn.depthwise_conv2d(x, W["dw2"], [1, 1, 1, 1], "SAME")),
]

# equivalent formulations whose framework gradient exists on CPU
REFERENCE = {
    "3x3 dilated same": lambda x: tf.nn.convolution(x, W["k3"], padding="SAME", dilations=2),
    "3x3 dilated valid": lambda x: tf.nn.convolution(x, W["k3"], padding="VALID", dilations=2),
    "grouped": lambda x: tf.concat([tf.nn.conv2d(x[..., 2 * g:2 * g + 2], W["g2"][..., 3 * g:3 * g + 3], 1, "SAME")
                                    for g in range(2)], axis=-1),
}


def _input_gradient(forward, x, upstream, overrides):
    @tf.function
    def grad(x):
        with gradient_scope(overrides):
            y = forward(x)
        return tf.gradients(tf.reduce_sum(y * upstream(y.shape)), x)[0]

    return grad(x).numpy()


@pytest.mark.parametrize("name,forward", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("size", [9, 10])
def test_forward_kernel_gradient_equals_framework(name, forward, size):
    x = tf.constant(rng.standard_normal((2, size, size, 4)), tf.float32)

    def upstream(shape):
        return tf.constant(np.random.default_rng(1).standard_normal(shape), tf.float32)

    ours = _input_gradient(forward, x, upstream, FORWARD_CONV_GRADIENTS)
    framework = _input_gradient(REFERENCE.get(name, forward), x, upstream, {})
    assert ours.shape == framework.shape == x.shape
    np.testing.assert_allclose(ours, framework, rtol=0, atol=1e-5 * np.abs(framework).max())


def test_forward_kernels_replace_backprop_input_ops():
    """The speed comes from not running Conv2DBackpropInput: check the traced graph has none for stride 1."""
    x = tf.zeros((1, 8, 8, 4))

    @tf.function
    def grad(x):
        with gradient_scope(FORWARD_CONV_GRADIENTS):
            y = tf.nn.conv2d(tf.nn.conv2d(x, W["k3"], 1, "SAME"), tf.transpose(W["k1"], [0, 1, 3, 2]), 2, "SAME")
        return tf.gradients(tf.reduce_sum(y), x)[0]

    types = {op.type for op in grad.get_concrete_function(x).graph.get_operations()}
    assert "Conv2DBackpropInput" not in types
    assert "Conv2DBackpropInput" in {op.type for op in tf.function(
        lambda x: tf.gradients(tf.reduce_sum(tf.nn.conv2d(x, W["k3"], 1, "SAME")), x)[0]
    ).get_concrete_function(x).graph.get_operations()}
