"""The rule every activation gets, against a derivation written here: for ``y = f(z)`` with ``z`` a
convolution of the input, the map is ``dz/dx`` applied to ``f'(z) * max(g, 0)`` (guided backprop) or
``max(g, 0)`` (Deconvnet), ``g`` the head's gradient at ``y``, and ``f'`` each activation's derivative written
out in numpy below.  Nothing of ``worker/`` is used but the engine under test.

Also the two defects other libraries' own test cases found: a one-filter convolution whose gradient arrives
as a scalar multiply, and a ReLU capped at 3 (a ``Relu`` then a clip in Keras 3) under Deconvnet.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tests.conftest import assert_path
from tests.reference import assert_close, gelu_derivative, sigmoid, swish_derivative
from worker import Deconvnet, GuidedBackprop, UnguidedReluError


# name -> (layer, f'(z) in numpy, a ReLU the default already guides)
ACTIVATIONS = {
    "relu": (lambda: layers.ReLU(), lambda z: (z > 0) * 1.0, True),
    "relu6": (lambda: layers.ReLU(max_value=6.0), lambda z: ((z > 0) & (z < 6)) * 1.0, True),
    "relu_capped_1": (lambda: layers.ReLU(max_value=1.0), lambda z: ((z > 0) & (z < 1)) * 1.0, True),
    "relu_threshold": (lambda: layers.ReLU(threshold=0.3), lambda z: (z > 0.3) * 1.0, True),
    "prelu": (lambda: layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25)),
              lambda z: np.where(z > 0, 1.0, 0.25), True),
    "leaky_relu": (lambda: layers.LeakyReLU(0.1), lambda z: np.where(z > 0, 1.0, 0.1), False),
    "relu_slope_cap": (lambda: layers.ReLU(negative_slope=0.1, max_value=1.0),
                       lambda z: np.where(z > 1, 0.0, np.where(z > 0, 1.0, 0.1)), False),
    "swish": (lambda: layers.Activation("swish"), swish_derivative, False),
    "gelu": (lambda: layers.Activation("gelu"), gelu_derivative, False),
    "gelu_tanh": (lambda: layers.Lambda(lambda t: keras.activations.gelu(t, approximate=True)), None, False),
    "hard_swish": (lambda: layers.Activation("hard_swish"),
                   lambda z: np.where(z <= -3, 0.0, np.where(z >= 3, 1.0, (2 * z + 3) / 6)), False),
    "hard_sigmoid": (lambda: layers.Activation("hard_sigmoid"), lambda z: ((z > -3) & (z < 3)) / 6.0, False),
    "elu": (lambda: layers.ELU(), lambda z: np.where(z > 0, 1.0, np.exp(np.minimum(z, 0))), False),
    "selu": (lambda: layers.Activation("selu"),
             lambda z: 1.0507009873554805 * np.where(z > 0, 1.0, 1.6732632423543772 * np.exp(np.minimum(z, 0))),
             False),
    "sigmoid": (lambda: layers.Activation("sigmoid"), lambda z: sigmoid(z) * (1 - sigmoid(z)), False),
    "tanh": (lambda: layers.Activation("tanh"), lambda z: 1 - np.tanh(z) ** 2, False),
}


def _gelu_tanh_derivative(z):
    c = np.sqrt(2 / np.pi)
    u = c * (z + 0.044715 * z ** 3)
    return 0.5 * (1 + np.tanh(u)) + 0.5 * z * (1 - np.tanh(u) ** 2) * c * (1 + 3 * 0.044715 * z ** 2)


ACTIVATIONS["gelu_tanh"] = (ACTIVATIONS["gelu_tanh"][0], _gelu_tanh_derivative, False)


#: a constant scale after an activation's last nonlinear op belongs to the next layer (it is linear: a ReLU's
#: rule must not take in a BatchNorm after it); only Deconvnet, which ignores f', can tell
TRAILING_SCALE = {"hard_sigmoid": 1 / 6}


def model_with(name, filters=4, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((10, 10, 3))
    z = layers.Conv2D(filters, 3, padding="same", name="conv",
                      kernel_initializer=keras.initializers.RandomNormal(stddev=1.5))(x)
    y = ACTIVATIONS[name][0]()(z)
    return keras.Model(x, layers.Dense(5, name="head")(layers.Flatten()(y)))


def images(n=3, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, 10, 10, 3), dtype=np.uint8)


def reference(model, name, batch, target, rule):
    """The map by the rule, derived here: conv -> f'(z) (numpy) -> head's gradient, one image at a time."""
    x = tf.constant(batch.astype(np.float32) / 255.0)
    conv = keras.Model(model.inputs, model.get_layer("conv").output)
    after = model.layers[model.layers.index(model.get_layer("conv")) + 1:]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        z = conv(x)
        y = after[0](z)
        tape.watch(y)
        h = y
        for layer in after[1:]:
            h = layer(h)
        score = tf.reduce_sum(tf.gather(h, target, batch_dims=1))
    g = tape.gradient(score, y).numpy().astype(np.float64)
    derivative = ACTIVATIONS[name][1](z.numpy().astype(np.float64))
    gz = derivative * np.maximum(g, 0) if rule == "guided" else np.maximum(g, 0) * TRAILING_SCALE.get(name, 1.0)
    return tape.gradient(z, x, output_gradients=tf.constant(gz, tf.float32)).numpy()


def check_rule(name, method, engine_path):
    model = model_with(name)
    cls = GuidedBackprop if method == "guided" else Deconvnet
    engine = cls(model, batch_size=2, preprocessing="scale01", reduction="none", map_dtype="float32",
                 activations="all", **engine_path)
    assert_path(engine, engine_path)
    out = engine.explain(images())
    expected = reference(model, name, images(), out.target_class[:, 0], method)
    assert_close(out.maps[:, 0], expected, rtol=1e-4)
    coverage = engine.report["coverage"]
    assert coverage["vanilla"] == {} and coverage["unresolved"] == [] and coverage["guided_total"] == 1


@pytest.mark.slow
@pytest.mark.rotate(per=("name",))  # every activation, with one method on one path
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_every_activation_gets_the_rule(name, method, engine_path):
    check_rule(name, method, engine_path)


@pytest.mark.parametrize("name", ["swish", "gelu", "hard_swish"])
def test_modern_activations_get_the_rule(name):
    check_rule(name, "guided", {})


@pytest.mark.parametrize("name", ["relu_capped_1", "relu_threshold", "prelu", "leaky_relu", "relu_slope_cap"])
def test_relu_variants_get_the_rule_by_default(name):
    """A ReLU with a cap, a threshold or a negative slope (leaky, PReLU) is a ReLU: the default gives it the rule, and
    the report names its ops (Deconvnet through a capped ReLU ignored the clip's forward gate before)."""
    model = model_with(name)
    for cls, rule in ((GuidedBackprop, "guided"), (Deconvnet, "deconvnet")):
        engine = cls(model, batch_size=2, preprocessing="scale01", reduction="none", map_dtype="float32")
        out = engine.explain(images())
        assert_close(out.maps[:, 0], reference(model, name, images(), out.target_class[:, 0], rule), rtol=1e-4)
        assert len(engine.report["coverage"]["guided"]) == 1 and engine.report["coverage"]["vanilla"] == {}


@pytest.mark.parametrize("name", ["swish", "gelu", "hard_swish", "elu", "sigmoid"])
def test_other_activations_are_refused_by_default_naming_the_option(name):
    with pytest.raises(UnguidedReluError, match=r"keep their plain gradient .*--activations all"):
        GuidedBackprop(model_with(name), batch_size=2)


def test_relu_beside_another_activation_keeps_it_exactly_plain_when_warned():
    """Default policy, ``relu_policy='warn'``: the swish keeps its plain gradient exactly (not half-guided),
    the ReLU is guided; the warning names the swish."""
    keras.utils.set_random_seed(0)
    x = keras.Input((10, 10, 3))
    z = layers.Conv2D(4, 3, padding="same", name="conv")(x)
    y = layers.Activation("swish")(z)
    model = keras.Model(x, layers.Dense(5)(layers.ReLU()(layers.Dense(8)(layers.Flatten()(y)))))
    with pytest.warns(UserWarning, match="Mul\\+Sigmoid x1"):
        engine = GuidedBackprop(model, batch_size=2, preprocessing="scale01", reduction="none",
                                map_dtype="float32", relu_policy="warn")
    assert engine.report["coverage"]["vanilla"] == {"Mul+Sigmoid": 1}
    assert engine.report["coverage"]["guided"] == {"Relu": 1}


@pytest.mark.parametrize("path", ["forward", "framework"])
def test_one_filter_convolution_with_a_scalar_multiply(path):
    """Conv2D(1, 3) -> Rescaling(2) -> ReLU -> Flatten -> Dense: the convolution's gradient arrives as a scalar
    multiply (an IndexError on the forward-kernel path before); against the numpy-free derivation above."""
    keras.utils.set_random_seed(0)
    x = keras.Input((10, 10, 3))
    z = layers.Rescaling(2.0)(layers.Conv2D(1, 3, padding="same", name="conv")(x))
    model = keras.Model(x, layers.Dense(5)(layers.Flatten()(layers.ReLU()(z))))
    engine = GuidedBackprop(model, batch_size=2, preprocessing="scale01", reduction="none", map_dtype="float32",
                            conv_gradients=path)
    out = engine.explain(images())
    xs = tf.constant(images().astype(np.float32) / 255.0)
    with tf.GradientTape() as tape:
        tape.watch(xs)
        pre = model.layers[2](model.layers[1](xs))
    post = keras.Sequential(model.layers[4:])
    with tf.GradientTape() as head:
        y = tf.nn.relu(pre)
        head.watch(y)
        score = tf.reduce_sum(tf.gather(post(y), out.target_class[:, 0], batch_dims=1))
    g = head.gradient(score, y).numpy()
    guided = g * (g > 0) * (pre.numpy() > 0)
    expected = tape.gradient(pre, xs, output_gradients=tf.constant(guided)).numpy()
    assert_close(out.maps[:, 0], expected, rtol=1e-4)
