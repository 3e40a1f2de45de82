"""Keras 2 models (tf-keras, i.e. ``tf.keras`` before TensorFlow 2.16) give exact maps, every way Keras 2 saves them.

The models are built here with tf-keras (no downloads): the question's CNN (Sequential), a MobileNetV2-style
transfer model (a nested base with DepthwiseConv2D and ``ReLU(max_value=6)``, a softmax head; functional and
Sequential around the base), a Lambda-ReLU
model, a subclassed model, and the shape of TensorFlow's transfer-learning tutorial (augmentation layers and
``preprocess_input`` called on a Keras tensor, which Keras 2 saves as a ``TFOpLambda``).  Each is saved as
``.keras``, ``.h5`` and a SavedModel directory and loaded through the engine.  The expected maps come from the
op-level re-derivation of ``tests/test_applications_reference.py`` (guided gradients defined there, run on the
tf-keras model built here, before it was saved): nothing of ``worker/`` but the engine under test.
"""

import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

tf_keras = pytest.importorskip("tf_keras")  # the `keras2` extra (part of the `test` extra)
from tf_keras import layers  # noqa: E402

from tests.conftest import assert_path  # noqa: E402
from tests.reference import grad_cam  # noqa: E402
from tests.test_applications_reference import reference  # noqa: E402
from worker import GradCAM, GuidedBackprop  # noqa: E402
from worker.engine.models import ModelLoadError, UnsafeModelError  # noqa: E402

SIZE = 16
FORMATS = ["keras", "h5", "savedmodel"]


def _base(name="base"):
    """MobileNetV2's first block, small: stride-2 conv, BN, ReLU6, depthwise conv, BN, ReLU6, 1x1 conv, BN."""
    image = layers.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(image)
    x = layers.ReLU(max_value=6.0)(layers.BatchNormalization()(x))
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.BatchNormalization()(layers.Conv2D(8, 1, use_bias=False)(x))
    return tf_keras.Model(image, x, name=name)


def cnn(head):
    """The question's CNN, small and Sequential, with its softmax head."""
    return tf_keras.Sequential([
        layers.Conv2D(8, 3, padding="same", input_shape=(SIZE, SIZE, 3)), layers.BatchNormalization(),
        layers.Activation("relu"), layers.MaxPool2D(2),
        layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(), layers.Activation("relu", name="last_act"),
        layers.MaxPool2D(2), layers.Flatten(), layers.Dense(16, activation="relu", name="hidden"),
        layers.BatchNormalization(), layers.Dropout(0.5), layers.Dense(4, activation=head)], name="small_cnn")


def transfer(head):
    """A MobileNetV2-style transfer model: a frozen nested base, pooling, dropout, a softmax head."""
    base = _base()
    base.trainable = False
    image = layers.Input((SIZE, SIZE, 3))
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(base(image, training=False)))
    return tf_keras.Model(image, layers.Dense(4, activation=head)(x), name="transfer")


def transfer_sequential(head):
    """The same as a Sequential around the base, as many transfer models are written."""
    base = _base()
    base.trainable = False
    return tf_keras.Sequential([layers.InputLayer((SIZE, SIZE, 3)), base, layers.GlobalAveragePooling2D(),
                                layers.Dense(4, activation=head)], name="transfer_sequential")


def lambda_relu(head):
    return tf_keras.Sequential([
        layers.Conv2D(8, 3, padding="same", input_shape=(SIZE, SIZE, 3)),
        layers.Lambda(lambda t: tf.nn.relu(t)),  # noqa: PLW0108 - the form users write
        layers.Flatten(), layers.Dense(4, activation=head)], name="lambda_relu")


@tf_keras.saving.register_keras_serializable(package="tests_keras2")
class SubclassedCNN(tf_keras.Model):
    def __init__(self, head=None, **kwargs):
        super().__init__(**kwargs)
        self.head = head
        self.conv = layers.Conv2D(8, 3, padding="same", activation="relu")
        self.pool = layers.MaxPool2D(2)
        self.flat = layers.Flatten()
        self.out = layers.Dense(4, activation=head)

    def call(self, x):
        return self.out(self.flat(self.pool(self.conv(x))))

    def get_config(self):
        return {"head": self.head, "name": self.name}


def subclassed(head):
    model = SubclassedCNN(head, name="subclassed")
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))
    return model


def tutorial(head):
    """TensorFlow's transfer-learning tutorial: augmentation, ``preprocess_input`` on a Keras tensor (saved as
    a ``TFOpLambda``), the frozen base called with training=False, pooling, dropout, one logit."""
    augment = tf_keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.2)], name="augment")
    base = _base()
    base.trainable = False
    image = layers.Input((SIZE, SIZE, 3))
    x = tf_keras.applications.mobilenet_v2.preprocess_input(augment(image))
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(base(x, training=False)))
    return tf_keras.Model(image, layers.Dense(1)(x), name="tutorial")


MODELS = {"cnn": cnn, "transfer": transfer, "transfer_sequential": transfer_sequential, "lambda": lambda_relu,
          "subclassed": subclassed, "tutorial": tutorial}
PREPROCESSING = {"tutorial": "none"}  # its own preprocess_input maps [0, 255] to [-1, 1]


def _randomize_batchnorm(model, rng):
    """Non-trivial BatchNorm statistics in every (nested) BN layer, so that BN and the gates are really tested."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])


def build(name, seed=0):
    """(model as saved, its logits twin with the same weights: the reference differentiates logits)."""
    tf_keras.utils.set_random_seed(seed)
    model = MODELS[name]("softmax" if name.startswith(("cnn", "transfer")) else None)
    _randomize_batchnorm(model, np.random.default_rng(seed))
    twin = MODELS[name](None)
    twin.set_weights(model.get_weights())
    return model, twin


def save(model, fmt, directory) -> str:
    """Save as a Keras 2 user does: ``.keras``, ``.h5`` or a SavedModel directory (``model.save("dir")``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ("saved_model" if fmt == "savedmodel" else f"model.{fmt}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf-keras warns that .h5 is legacy
        model.save(str(path), **({"save_format": "tf"} if fmt == "savedmodel" else {}))
    return str(path)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)


def _model_input(name, images):
    return images.astype(np.float32) / (1.0 if PREPROCESSING.get(name) == "none" else 255.0)


def check(name, fmt, images, tmp_path, **options):
    """Save model ``name`` as ``fmt``, explain it through the engine, compare with the reference."""
    model, twin = build(name, seed=sum(map(ord, name)))
    path = save(model, fmt, tmp_path)
    gbp = GuidedBackprop(path, batch_size=len(images), preprocessing=PREPROCESSING.get(name, "scale01"),
                         reduction="none", map_dtype="float32", safe_mode=False, **options)
    expected, logits = reference(twin, _model_input(name, images))
    vanilla, _ = reference(twin, _model_input(name, images), guided=False)
    assert np.abs(expected - vanilla).max() > 0.05 * np.abs(expected).max(), "the reference tells them apart"
    out = gbp.explain(images)
    np.testing.assert_array_equal(out.predicted_class, logits.argmax(-1))
    np.testing.assert_allclose(out.maps[:, 0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert gbp.report["coverage"]["unguided"] == [] and gbp.report["coverage"]["guided_total"] >= 1
    assert gbp.report["model"]["kind"] == ("saved_model" if fmt == "savedmodel" else "tf_keras")
    return gbp


# the default run: one file of each kind Keras 3 could not read, and the question's .h5 (about 10 s)
@pytest.mark.parametrize("name, fmt", [("cnn", "h5"), ("transfer", "keras"), ("transfer", "h5"),
                                       ("tutorial", "keras"), ("subclassed", "keras")])
def test_keras2_file_gives_exact_maps(name, fmt, images, tmp_path):
    check(name, fmt, images, tmp_path)


@pytest.mark.slow
@pytest.mark.rotate(per=("fmt", "engine_path"))  # every format on each path, the model rotating
@pytest.mark.parametrize("name, fmt", [(name, fmt) for fmt in FORMATS for name in sorted(MODELS)
                                       if (name, fmt) != ("subclassed", "h5")])  # Keras 2 cannot write that one
def test_every_keras2_model_and_format_gives_exact_maps(name, fmt, images, tmp_path, engine_path):
    """Each model in each format, on the CPU's default path and the GPU's (XLA + the framework's convolution
    gradients, rehearsed on the CPU)."""
    assert_path(check(name, fmt, images, tmp_path, **engine_path), engine_path)


def test_keras2_cannot_write_a_subclassed_model_to_h5(tmp_path):
    """Why the family above has no subclassed .h5: Keras 2 itself refuses to write one, so no such file exists."""
    with pytest.raises(NotImplementedError):
        build("subclassed")[0].save(str(tmp_path / "model.h5"))


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_keras2_lambda_needs_the_opt_in(fmt, images, tmp_path):
    """Safe mode holds for Keras 2 files too (tf-keras itself checks it only for .keras files)."""
    path = save(build("lambda")[0], fmt, tmp_path)
    with pytest.raises(UnsafeModelError, match="safe_mode=False"):
        GuidedBackprop(path)


def _closure_lambda_model():
    import tensorflow as tf_in_closure  # imported inside the function: the Lambda's closure holds it

    return tf_keras.Sequential([
        layers.Conv2D(8, 3, padding="same", input_shape=(SIZE, SIZE, 3)),
        layers.Lambda(lambda t: tf_in_closure.nn.relu(t)),  # noqa: PLW0108
        layers.Flatten(), layers.Dense(4)])


def test_keras2_lambda_using_a_module_its_closure_holds_loads(images, tmp_path):
    """tf-keras saves a closure's module as a dict too (Keras 2 cannot write such a model to .h5 at all)."""
    tf_keras.utils.set_random_seed(2)
    model = _closure_lambda_model()
    path = save(model, "keras", tmp_path)
    gbp = GuidedBackprop(path, batch_size=len(images), preprocessing="scale01", reduction="none",
                         map_dtype="float32", safe_mode=False)
    expected, _ = reference(model, _model_input("lambda", images))
    np.testing.assert_allclose(gbp.explain(images).maps[:, 0], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_in_memory_tf_keras_model_gives_exact_maps(images):
    model, twin = build("transfer", seed=4)
    gbp = GuidedBackprop(model, batch_size=len(images), preprocessing="scale01", reduction="none",
                         map_dtype="float32")
    expected, _ = reference(twin, _model_input("transfer", images))
    np.testing.assert_allclose(gbp.explain(images).maps[:, 0], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert gbp.report["model"]["kind"] == "tf_keras" and gbp.report["model"]["fingerprint"].startswith("sha256:")


def test_without_tf_keras_a_keras2_file_names_the_extra(monkeypatch, images, tmp_path):
    """tf-keras not installed (its import fails): a Keras 2 file Keras 3 cannot rebuild is refused in one line
    that names the extra and the SavedModel alternative; a Keras 2 .h5 that Keras 3 reads still loads, exact."""
    paths = {fmt: save(build("tutorial")[0], fmt, tmp_path / fmt) for fmt in ("keras", "h5")}
    model, twin = build("cnn", seed=1)
    cnn_h5 = save(model, "h5", tmp_path)
    expected, _ = reference(twin, _model_input("cnn", images))
    monkeypatch.setitem(sys.modules, "tf_keras", None)
    for path in paths.values():
        with pytest.raises(ModelLoadError) as err:
            GuidedBackprop(path)
        message = str(err.value)
        assert "\n" not in message and "Keras 2.21.0" in message, message
        assert 'pip install "guided-saliency[keras2]"' in message and "SavedModel" in message, message
    gbp = GuidedBackprop(cnn_h5, batch_size=len(images), preprocessing="scale01", reduction="none",
                         map_dtype="float32")
    assert gbp.report["model"]["kind"] == "keras"  # Keras 3's reader of legacy .h5 files
    np.testing.assert_allclose(gbp.explain(images).maps[:, 0], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", [("cnn", "keras"), ("transfer", "h5"), ("lambda", "h5")])
def test_keras2_bfloat16_stays_close(name, fmt, images, tmp_path):
    """bfloat16 through tf-keras's dtype policy (a nested model's layers too; a Lambda rebuilt under the policy
    with the opt-in it was loaded with), against the float32 reference."""
    model, twin = build(name, seed=7)
    path = save(model, fmt, tmp_path)
    expected, logits = reference(twin, _model_input(name, images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native kernels warns that it is slower
        reduced = GuidedBackprop(path, target="label", precision="bfloat16", batch_size=len(images),
                                 preprocessing="scale01", reduction="none", map_dtype="float32", safe_mode=False)
    layers_under_policy = {lay.compute_dtype for lay in reduced.source.model._flatten_layers(include_self=False)
                           if not isinstance(lay, (layers.InputLayer, tf_keras.Model))}
    assert layers_under_policy == {"bfloat16"}, layers_under_policy
    maps = reduced.explain(images, logits.argmax(-1)).maps[:, 0].reshape(len(images), -1)
    flat = expected.reshape(len(images), -1)
    cosine = (maps * flat).sum(1) / np.linalg.norm(maps, axis=1) / np.linalg.norm(flat, axis=1)
    # the README's bfloat16 figure (mean >= 0.98); on these small nets one gate flip moves an image's map more
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.9, cosine


@pytest.mark.slow
def test_keras2_layer_target_and_gradcam(images, tmp_path):
    """``layer:`` targets and Grad-CAM's layer search work on a tf-keras model's traced graph."""
    model, twin = build("cnn", seed=7)
    path = save(model, "keras", tmp_path)
    x = _model_input("cnn", images)
    _, logits = reference(twin, x)
    options = {"batch_size": len(images), "preprocessing": "scale01", "reduction": "none", "map_dtype": "float32"}
    # layer:hidden differentiates the sum of that layer's activation: the reference on a model whose one
    # "logit" is that sum
    summed = tf_keras.Model(twin.inputs, tf.reduce_sum(twin.get_layer("hidden").output, -1, keepdims=True))
    layer_expected, _ = reference(summed, x)
    out = GuidedBackprop(path, target="layer:hidden", **options).explain(images)
    np.testing.assert_allclose(out.maps[:, 0], layer_expected, rtol=1e-4, atol=1e-5 * np.abs(layer_expected).max())
    # Grad-CAM at a named tf-keras layer, against the plain gradient there (tests/reference.py's Grad-CAM)
    cam = GradCAM(path, cam_layer="last_act", **options)
    got = cam.explain(images).maps[:, 0]
    assert "last_act" in cam.report["cam_tensor"], cam.report["cam_tensor"]
    at_layer = tf_keras.Model(twin.inputs, [twin.get_layer("last_act").output, twin.output])
    with tf.GradientTape() as tape:
        activation, scores = at_layer(tf.constant(x), training=False)
        score = tf.reduce_sum(tf.gather(scores, logits.argmax(-1), batch_dims=1))
    gradient = tape.gradient(score, activation)
    want = grad_cam(activation.numpy().astype(np.float64), gradient.numpy().astype(np.float64), (SIZE, SIZE))
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_keras2_file_through_the_job(ray_local, tmp_path):
    """The run record rebuilds the engine from the model path in Ray actors: a Keras 2 file works there too."""
    from tests import jobdata
    from worker.data.schema import read_maps, read_metadata
    from worker.job import JobConfig, run

    import pyarrow.parquet as pq

    model, _ = build("transfer", seed=9)
    path = save(model, "h5", tmp_path)
    images, labels = jobdata.digits(12, size=SIZE)
    jobdata.write_hf(tmp_path / "data.parquet", images, labels)
    out = tmp_path / "out"
    summary = run(JobConfig(model=path, input=str(tmp_path / "data.parquet"), output=str(out),
                            preprocessing="scale01", batch_size=4))
    assert summary["rows_out"] == 12 and summary["errors_this_run"] == 0
    table = pq.read_table(str(out)).sort_by("id")
    order = [int(i.split("#")[1]) for i in table["id"].to_pylist()]
    want = GuidedBackprop(path, preprocessing="scale01", batch_size=4).explain(images[order]).as_float32()[:, 0]
    np.testing.assert_allclose(read_maps(table), want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
    assert read_metadata(table.schema)["model"]["kind"] == "tf_keras"
