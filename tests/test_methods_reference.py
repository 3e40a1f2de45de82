"""Grad-CAM, Guided Grad-CAM and SmoothGrad against independent references: the numpy forward/backward of
tests/reference.py on the question's CNN, and a plain-TensorFlow re-derivation (a Keras sub-model and a
GradientTape) on keras.applications models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference as ref
from tests.conftest import assert_path
from worker import GradCAM, GuidedBackprop, GuidedGradCAM
from tests.models import small_cnn
from worker.engine.smoothing import noisy_copies

SIZE = 32


@pytest.fixture(scope="module")
def model():
    """Three classes, BatchNorm randomised: its Grad-CAM is positive at the default and the chosen layer."""
    return ref.randomize_batchnorm(small_cnn(SIZE, classes=3, seed=1), 1)


images = pytest.fixture(scope="module", name="images")(
    lambda: np.random.default_rng(5).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8))


def _last_relu(layers):
    """Index (in the reference's layers) of the last ReLU before Flatten: where Grad-CAM looks by default."""
    return max(i for i, (kind, _) in enumerate(layers[:[k for k, _ in layers].index("flatten")]) if kind == "relu")


def _reference_cam(model, images, at=None, target=None):
    layers = ref.layers_of(model)
    at = _last_relu(layers) if at is None else at
    _, logits, activation, gradient = ref.sequential_saliency(layers, images / 255.0, target=target, guided=False,
                                                              capture=at)
    return ref.grad_cam(activation, gradient, (SIZE, SIZE)), logits


def test_gradcam_matches_the_numpy_reference(model, images, engine_path):
    cam = GradCAM(model, batch_size=2, preprocessing="scale01", map_dtype="float32", **engine_path)
    assert_path(cam, engine_path)
    out = cam.explain(images)
    expected, logits = _reference_cam(model, images)
    np.testing.assert_array_equal(out.predicted_class, logits.argmax(-1))
    assert out.maps.shape == (5, 1, SIZE, SIZE) and expected.max() > 0
    ref.assert_close(out.maps[:, 0], expected)
    assert cam.report["method"] == "gradcam" and cam.report["cam_tensor"].endswith("Relu")


@pytest.mark.parametrize("size,stride", [(12, 3), (35, 5)])
def test_gradcam_upsamples_by_odd_factors(size, stride, engine_path):
    """A 4 x 4 CAM to 12 x 12, a 7 x 7 one to 35 x 35: XLA's own bilinear resize (the GPU's path) is wrong for
    odd whole factors; the map must not be."""
    keras.utils.set_random_seed(2)
    x = keras.Input((size, size, 3))
    a = keras.layers.ReLU(name="features")(keras.layers.Conv2D(3, stride, strides=stride)(x))
    net = keras.Model(x, keras.layers.Dense(4)(keras.layers.Flatten()(a)))
    pictures = np.random.default_rng(3).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    cam = GradCAM(net, batch_size=2, map_dtype="float32", cam_layer="features", **engine_path)
    assert_path(cam, engine_path)
    out = cam.explain(pictures)
    inputs = tf.constant(pictures, tf.float32)
    features = keras.Model(net.inputs, net.get_layer("features").output)
    with tf.GradientTape() as tape:
        act = features(inputs)
        tape.watch(act)
        logits = net.layers[-1](net.layers[-2](act))
        score = tf.reduce_sum(tf.gather(logits, out.target_class[:, 0], batch_dims=1))
    expected = ref.grad_cam(act.numpy().astype(np.float64), tape.gradient(score, act).numpy(), (size, size))
    ref.assert_close(out.maps[:, 0], expected, rtol=1e-4)


def test_gradcam_at_a_chosen_layer(model, images):
    """--cam-layer: an earlier block (4x4), found by the layer's name in the traced graph; a fixed class."""
    layers = ref.layers_of(model)
    relus = [i for i, (kind, _) in enumerate(layers) if kind == "relu"]
    activations = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    cam = GradCAM(model, batch_size=5, preprocessing="scale01", map_dtype="float32", cam_layer=activations[3].name,
                  target="class:2")
    expected, _ = _reference_cam(model, images, at=relus[3], target=[2] * len(images))
    assert expected.max() > 0
    ref.assert_close(cam.explain(images).maps[:, 0], expected)
    assert activations[3].name in cam.report["cam_tensor"]
    with pytest.raises(ValueError, match="cam_layer 'nope'"):
        GradCAM(model, batch_size=1, cam_layer="nope")


def test_guided_gradcam_is_the_guided_map_times_the_cam(model, images, engine_path):
    engine = GuidedGradCAM(model, batch_size=2, preprocessing="scale01", reduction="none", map_dtype="float32",
                           **engine_path)
    out = engine.explain(images)
    guided, _ = ref.sequential_saliency(ref.layers_of(model), images / 255.0)
    cam, _ = _reference_cam(model, images)
    ref.assert_close(out.maps[:, 0], guided * cam[..., None])
    assert engine.report["coverage"]["guided"] == {"Relu": 9}  # every ReLU guided, the head's included


def test_smoothgrad_is_the_mean_over_noisy_copies(model, images):
    n, noise = 4, 0.2
    engine = GuidedBackprop(model, batch_size=2, preprocessing="scale01", reduction="none", map_dtype="float32",
                            smooth=n, noise=noise)
    out = engine.explain(images)
    x = tf.constant(images / 255.0, tf.float32)
    copies = noisy_copies(x, tf.constant(images), n, noise).numpy().reshape(len(images), n + 1, SIZE, SIZE, 3)
    layers = ref.layers_of(model)
    _, logits = ref.sequential_saliency(layers, images / 255.0)
    target = logits.argmax(-1)  # the clean image decides the target
    expected = np.mean([ref.sequential_saliency(layers, copies[:, c], target=target)[0] for c in range(1, n + 1)],
                       axis=0)
    np.testing.assert_array_equal(out.predicted_class, target)
    ref.assert_close(out.maps[:, 0], expected, rtol=1e-4)
    assert engine.report["smoothing"] == {"copies": n, "noise": noise}
    # the noise really moved the map, and a row's noise does not depend on its batch
    plain = GuidedBackprop(model, batch_size=5, preprocessing="scale01", reduction="none", map_dtype="float32")
    assert np.abs(plain.explain(images).maps - out.maps).max() > 0.05 * np.abs(out.maps).max()
    alone = engine.explain(images[3:4])
    np.testing.assert_allclose(alone.maps[0], out.maps[3], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name,layer", [("MobileNetV2", "out_relu"), ("ResNet50", "conv5_block3_out")])
def test_applications_match_a_plain_tensorflow_derivation(name, layer):
    from tests.test_applications_reference import NATIVE_PRESET, _images, application, preprocess, reference

    model = application(name)
    images = _images()[:4]
    x = tf.constant(preprocess(images, NATIVE_PRESET[name]), tf.float32)
    split = keras.Model(model.inputs, [model.get_layer(layer).output, model.outputs[0]])
    with tf.GradientTape() as tape:
        activation, logits = split(x, training=False)
        score = tf.reduce_sum(tf.gather(logits, tf.argmax(logits, axis=-1), batch_dims=1))
    gradient = tape.gradient(score, activation)
    weights = tf.reduce_mean(gradient, axis=[1, 2], keepdims=True)
    expected_cam = tf.image.resize(tf.nn.relu(tf.reduce_sum(activation * weights, -1, keepdims=True)),
                                   x.shape[1:3])[..., 0].numpy()
    cam = GradCAM(model, batch_size=4, preprocessing=NATIVE_PRESET[name], map_dtype="float32")
    assert cam.report["cam_tensor"].split("/")[-2].startswith(layer)  # found on its own: the last conv block
    ref.assert_close(cam.explain(images).maps[:, 0], expected_cam, rtol=1e-4)
    guided, _ = reference(model, preprocess(images, NATIVE_PRESET[name]))
    both = GuidedGradCAM(model, batch_size=4, preprocessing=NATIVE_PRESET[name], reduction="none",
                         map_dtype="float32")
    # the guided factor as tests/test_applications_reference.py checks it (5e-3: a ReLU whose input is within
    # rounding of 0 may take the other side; ResNet50 on an avx512 host: 3.3e-4 at one pixel)
    ref.assert_close(both.explain(images).maps[:, 0], guided * expected_cam[..., None], rtol=5e-3)
