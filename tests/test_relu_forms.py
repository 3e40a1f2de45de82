"""Every form a ReLU can take is guided: checked against a numpy MLP reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tests.conftest import assert_path
from tests.reference import guided_gate, vanilla_gate
from worker import Deconvnet, GuidedBackprop

SHAPE = (6, 6, 3)


@keras.saving.register_keras_serializable(package="tests")
class OpsRelu(layers.Layer):
    def call(self, x):
        return keras.ops.relu(x)


@keras.saving.register_keras_serializable(package="tests")
class TfRelu(layers.Layer):
    def call(self, x):
        return tf.nn.relu(x)


def _hidden(form):
    """(layers producing the hidden activation from Dense output, upper clip of the ReLU)."""
    return {
        "activation_layer_relu": ([layers.Activation("relu")], None),
        "activation_layer_relu6": ([layers.Activation("relu6")], 6.0),
        "relu_layer": ([layers.ReLU()], None),
        "relu_layer_max6": ([layers.ReLU(max_value=6.0)], 6.0),
        "relu_layer_max2": ([layers.ReLU(max_value=2.0)], 2.0),
        "lambda_tf_nn_relu": ([layers.Lambda(tf.nn.relu)], None),
        "custom_layer_keras_ops_relu": ([OpsRelu()], None),
        "custom_layer_tf_nn_relu": ([TfRelu()], None),
        "nested_model": ([keras.Sequential([layers.ReLU()], name="inner")], None),
    }[form]


def build(form, seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input(SHAPE)
    x = layers.Flatten()(image)
    if form in ("dense_activation_relu", "dense_tf_nn_relu"):
        h = layers.Dense(16, activation="relu" if form == "dense_activation_relu" else tf.nn.relu,
                         name="hidden")(x)
        upper = None
    else:
        h = layers.Dense(16, name="hidden")(x)
        extra, upper = _hidden(form)
        for layer in extra:
            h = layer(h)
    out = layers.Dense(5, activation="softmax")(h)
    model = keras.Model(image, out)
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1.2, (108, 16))
    b1 = rng.normal(0, 1.0, 16)
    w2 = rng.normal(0, 1.0, (16, 5))
    b2 = rng.normal(0, 0.1, 5)
    dense = [lay for lay in model.layers if isinstance(lay, layers.Dense)]
    dense[0].set_weights([w1, b1])
    dense[1].set_weights([w2, b2])
    return model, (w1, b1, w2, b2, upper)


def deconv_gate(grad, pre, upper=None):
    """Deconvnet: positive gradients pass, whatever the forward input (``pre``, ``upper`` unused)."""
    return grad * (grad > 0)


def reference(params, images, guided=True, hidden_target=None, gate=None):
    w1, b1, w2, b2, upper = params
    x = images.reshape(len(images), -1) / 255.0
    pre = x @ w1 + b1
    act = np.maximum(pre, 0) if upper is None else np.clip(pre, 0, upper)
    logits = act @ w2 + b2
    if hidden_target is None:
        g_act = w2[:, logits.argmax(1)].T
    else:
        g_act = np.ones_like(act) if hidden_target == "sum" else np.eye(16)[[hidden_target] * len(x)]
    g_pre = (gate or (guided_gate if guided else vanilla_gate))(g_act, pre, upper)
    return (g_pre @ w1.T).reshape(images.shape), pre


FORMS = ["dense_activation_relu", "dense_tf_nn_relu", "activation_layer_relu", "activation_layer_relu6",
         "relu_layer", "relu_layer_max6", "relu_layer_max2", "lambda_tf_nn_relu",
         "custom_layer_keras_ops_relu", "custom_layer_tf_nn_relu", "nested_model"]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).integers(0, 256, (8, *SHAPE), dtype=np.uint8)


def _explain(model, images, **kw):
    gbp = GuidedBackprop(model, batch_size=8, preprocessing="scale01", reduction="none", map_dtype="float32",
                         **kw)
    return gbp, gbp.explain(images)


def _assert_guided(maps, params, images):
    expected, pre = reference(params, images)
    vanilla, _ = reference(params, images, guided=False)
    assert np.abs(expected - vanilla).max() > 1e-3, "this model does not tell guided from vanilla"
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    return pre


@pytest.mark.parametrize("form", FORMS)
def test_relu_form_is_guided(form, images, engine_path):
    model, params = build(form)
    gbp, out = _explain(model, images, safe_mode=False, **engine_path)
    assert_path(gbp, engine_path)
    pre = _assert_guided(out.maps[:, 0], params, images)
    if params[4] is not None:  # the clipped forms really see pre-activations above the clip
        assert (pre > params[4]).any()
    assert gbp.report["coverage"]["guided_total"] == 1
    assert gbp.report["coverage"]["unguided"] == []


def save_model(model, fmt, directory) -> str:
    """Save as a user would: ``.keras``, ``.h5`` or a SavedModel (``fmt="export"``); return the path."""
    if fmt == "export":
        path = directory / "exported"
        model.export(str(path), verbose=False)
    else:
        path = directory / f"model.{fmt}"
        model.save(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["keras", "h5", "export"])
def test_saved_formats_are_guided(fmt, images, tmp_path, engine_path):
    model, params = build("relu_layer_max6", seed=3)
    gbp, out = _explain(save_model(model, fmt, tmp_path), images, **engine_path)  # a SavedModel under XLA: its placeholder compiles
    assert_path(gbp, engine_path)
    _assert_guided(out.maps[:, 0], params, images)
    assert gbp.report["model"]["kind"] == ("saved_model" if fmt == "export" else "keras")
    assert gbp.report["score"] == "logits (final softmax stripped)"


def test_layer_target_sum_and_channel(images):
    model, params = build("dense_activation_relu", seed=4)
    for target, hidden in [("layer:hidden", "sum"), ("layer:hidden:3", 3)]:
        gbp, out = _explain(model, images, target=target)
        expected, pre = reference(params, images, hidden_target=hidden)
        np.testing.assert_allclose(out.maps[:, 0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max() + 1e-12)
        assert (out.target_class == -1).all()
        act = np.maximum(pre, 0)
        want = act.sum(1) if hidden == "sum" else act[:, hidden]
        np.testing.assert_allclose(out.target_score[:, 0], want, rtol=1e-4, atol=1e-5)


def test_probability_score_differentiates_softmax(images):
    model, params = build("relu_layer", seed=6)
    gbp, out = _explain(model, images, score="probability")
    w1, b1, w2, b2, _ = params
    x = images.reshape(len(images), -1) / 255.0
    pre = x @ w1 + b1
    logits = np.maximum(pre, 0) @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = logits.argmax(1)
    g_logits = p[np.arange(len(t)), t][:, None] * (np.eye(5)[t] - p)
    expected = (guided_gate(g_logits @ w2.T, pre) @ w1.T).reshape(images.shape)
    np.testing.assert_allclose(out.maps[:, 0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(out.target_score[:, 0], p.max(1), rtol=1e-5)
    assert gbp.report["score"] == "probability (model softmax output)"


@pytest.mark.parametrize("form", ["dense_activation_relu", "activation_layer_relu6", "relu_layer_max6",
                                  "lambda_tf_nn_relu", "nested_model"])
def test_deconvnet_passes_positive_gradients_at_every_relu(form, images):
    model, params = build(form, seed=8)
    dcn = Deconvnet(model, batch_size=8, preprocessing="scale01", reduction="none", map_dtype="float32",
                    safe_mode=False)
    maps = dcn.explain(images).maps[:, 0]
    expected, _ = reference(params, images, gate=deconv_gate)
    guided, _ = reference(params, images)
    assert np.abs(expected - guided).max() > 1e-3, "this model does not tell deconvnet from guided backprop"
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert dcn.report["method"] == "deconvnet" and dcn.report["coverage"]["guided_total"] == 1
    assert dcn.report["coverage"]["unguided"] == []
