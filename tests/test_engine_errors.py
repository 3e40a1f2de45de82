"""Clear errors, the coverage refusal, and keras.applications coverage counts."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from worker import GuidedBackprop, ModelLoadError, UnguidedReluError, UnsafeModelError


def small(activation="relu", shape=(6, 6, 3)):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape), layers.Flatten(), layers.Dense(8, activation=activation),
                             layers.Dense(3)])


@pytest.fixture(scope="module")
def gbp():
    return GuidedBackprop(small(), batch_size=2, target="label")


def test_wrong_dtype_and_shape(gbp):
    with pytest.raises(TypeError, match="uint8"):
        gbp.explain(np.zeros((2, 6, 6, 3), np.float32), labels=[0, 1])
    for shape in ((2, 6, 6, 2), (6, 6, 3), (2, 1, 6, 6, 3)):  # two channels; one image, not a batch; 5-D
        with pytest.raises(ValueError, match=r"\(N, H, W, 3\), \(N, H, W, 1\) or \(N, H, W\)"):
            gbp.explain(np.zeros(shape, np.uint8), labels=[0, 1])


def test_labels_missing_or_out_of_range(gbp):
    images = np.zeros((3, 6, 6, 3), np.uint8)
    with pytest.raises(ValueError, match="needs labels"):
        gbp.explain(images)
    with pytest.raises(ValueError, match=r"out of range \[0, 3\) at positions \[1, 2\]"):
        gbp.explain(images, labels=[0, 3, -1])


def test_no_images_need_no_labels(gbp):
    """An empty batch (every row of a job's batch failed before the engine) is an empty explanation."""
    out = gbp.explain(np.zeros((0, 6, 6, 3), np.uint8))
    assert len(out) == 0 and out.maps.shape == (0, 1, 6, 6)
    assert len(gbp.explain(np.zeros((0, 6, 6, 3), np.uint8), labels=np.zeros(0, np.float64))) == 0


def test_bad_targets():
    with pytest.raises(ValueError, match="does not exist; layers are"):
        GuidedBackprop(small(), target="layer:nope")
    with pytest.raises(ValueError, match="target class 7 out of range"):
        GuidedBackprop(small(), target="class:7")
    with pytest.raises(ValueError, match="bad target"):
        GuidedBackprop(small(), target="top:0")


def test_models_we_cannot_explain(tmp_path):
    a, b = keras.Input((4, 4, 3)), keras.Input((4, 4, 3))
    two_in = keras.Model([a, b], layers.Dense(2)(layers.Flatten()(layers.Add()([a, b]))))
    with pytest.raises(ModelLoadError, match="2 inputs; supported models"):
        GuidedBackprop(two_in)
    flat = layers.Flatten()(a)
    two_out = keras.Model(a, [layers.Dense(2, activation="relu")(flat), layers.Dense(3)(flat)])
    with pytest.raises(ModelLoadError, match="2 outputs; supported models.*output=<index>"):
        GuidedBackprop(two_out)
    assert GuidedBackprop(two_out, output=0, relu_policy="warn").source.num_classes == 2
    segmenter = keras.Model(a, layers.Conv2D(2, 1, activation="relu")(a))
    with pytest.raises(ModelLoadError, match="not an image classifier"):
        GuidedBackprop(segmenter)
    with pytest.raises(ModelLoadError, match="does not exist"):
        GuidedBackprop(str(tmp_path / "missing.keras"))
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        GuidedBackprop(str(junk))
    with pytest.raises(ModelLoadError, match="not a model file"):
        GuidedBackprop(str(tmp_path / "junk.keras").replace(".keras", ".txt") if junk.rename(
            tmp_path / "junk.txt") else "")


def test_lambda_model_refused_in_safe_mode(tmp_path):
    image = keras.Input((6, 6, 3))
    # a deserialized lambda sees another module's globals: import inside it
    relu = layers.Lambda(lambda t: __import__("tensorflow").nn.relu(t), output_shape=(4,))
    h = relu(layers.Dense(4)(layers.Flatten()(image)))
    path = tmp_path / "lambda.keras"
    keras.Model(image, layers.Dense(2)(h)).save(str(path))
    with pytest.raises(UnsafeModelError, match="--allow-unsafe-deserialization"):
        GuidedBackprop(str(path))
    assert GuidedBackprop(str(path), safe_mode=False).report["coverage"]["guided_total"] == 1


def test_model_without_relu_is_refused_or_warned():
    with pytest.raises(UnguidedReluError, match="no ReLU"):
        GuidedBackprop(small("sigmoid"))
    with pytest.warns(UserWarning, match="no ReLU"):
        gbp = GuidedBackprop(small("gelu"), relu_policy="warn")
    assert gbp.report["coverage"]["vanilla"] == {"Erfc+Mul+Neg": 1}  # GELU, kept plain and named


class HiddenRelu(layers.Layer):
    """A ReLU behind a tf.function: a call op the override cannot enter."""

    @tf.function
    def _relu(self, x):
        return tf.nn.relu(x)

    def call(self, x):
        return self._relu(x)


def test_unreachable_relu_is_named():
    image = keras.Input((6, 6, 3))
    h = layers.Dense(8, activation="relu")(layers.Flatten()(image))
    model = keras.Model(image, layers.Dense(2)(HiddenRelu()(layers.Dense(8)(h))))
    with pytest.raises(UnguidedReluError, match="could not be guided"):
        GuidedBackprop(model)
    with pytest.warns(UserWarning, match="could not be guided"):
        gbp = GuidedBackprop(model, relu_policy="warn")
    assert gbp.report["coverage"]["guided_total"] == 1 and gbp.report["coverage"]["unguided"]


def _relu_layers(model):
    """Independent count of ReLU activations from the Keras layer list."""
    count = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.ReLU):
            count += 1
        elif isinstance(layer, layers.Activation):
            count += layer.get_config()["activation"] in ("relu", "relu6")
        elif getattr(layer, "activation", None) is keras.activations.relu:
            count += 1
    return count


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "VGG16"])
def test_keras_applications_every_relu_guided(name):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    nested = keras.Sequential([keras.Input((64, 64, 3)), model], name="wrapper")  # an application used as a layer
    gbp = GuidedBackprop(nested, batch_size=1, preprocessing="caffe", warmup=False)
    cov = gbp.report["coverage"]
    expected = _relu_layers(model)
    assert expected == {"ResNet50": 49, "MobileNetV2": 35, "VGG16": 15}[name]
    assert cov["guided_total"] == expected and cov["unguided"] == []
    out = gbp.explain(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    assert out.maps.shape == (1, 1, 64, 64) and np.isfinite(out.maps.astype(np.float32)).all()
