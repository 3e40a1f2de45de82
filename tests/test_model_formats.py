"""Every way a user saves a model loads with exact guided maps, or fails with a clear ModelLoadError.

Sequential, functional and subclassed models; ``.keras``, ``.h5`` and SavedModel (``model.export``);
with a plain ReLU, a Lambda written with ``tf.nn.relu`` (as users write them), and a custom layer.
Maps are checked against the numpy MLP reference of ``tests/test_relu_forms.py``.
"""

import keras
import numpy as np
import numpy as numpy_alias  # a module name the loader cannot know, used in a Lambda below
import pytest
import tensorflow as tf
from keras import layers

from tests.test_relu_forms import SHAPE, TfRelu, reference, save_model
from worker import GuidedBackprop
from worker.engine.models import ModelLoadError


@keras.saving.register_keras_serializable(package="tests")
class SubclassedMLP(keras.Model):
    def __init__(self, relu="plain", **kwargs):
        super().__init__(**kwargs)
        self.relu_form = relu
        self.flatten = layers.Flatten()
        self.hidden = layers.Dense(16)
        self.relu = _relu(relu)
        self.out = layers.Dense(5)

    def call(self, x):
        return self.out(self.relu(self.hidden(self.flatten(x))))

    def get_config(self):
        return {**super().get_config(), "relu": self.relu_form}


def _relu(form):
    if form == "lambda_closure":
        return _closure_lambda()
    return {"plain": layers.ReLU(),
            "lambda": layers.Lambda(lambda t: tf.nn.relu(t)),  # noqa: PLW0108 - the form users write
            "custom": TfRelu()}[form]


def _closure_lambda():
    import keras  # noqa: PLW0406 - imported inside the function: the Lambda's closure holds it, not its globals

    return layers.Lambda(lambda t: keras.ops.relu(t))  # noqa: PLW0108


def build(kind, relu, seed):
    keras.utils.set_random_seed(seed)
    if kind == "sequential":
        model = keras.Sequential([keras.Input(SHAPE), layers.Flatten(), layers.Dense(16), _relu(relu),
                                  layers.Dense(5)])
    elif kind == "functional":
        image = keras.Input(SHAPE)
        h = _relu(relu)(layers.Dense(16)(layers.Flatten()(image)))
        model = keras.Model(image, layers.Dense(5)(h))
    else:
        model = SubclassedMLP(relu)
        model(np.zeros((1, *SHAPE), np.float32))
    rng = np.random.default_rng(seed)
    params = (rng.normal(0, 1.2, (108, 16)), rng.normal(0, 1.0, 16), rng.normal(0, 1.0, (16, 5)),
              rng.normal(0, 0.1, 5), None)
    dense = [lay for lay in model._flatten_layers(include_self=False) if isinstance(lay, layers.Dense)]
    dense[0].set_weights(params[:2])
    dense[1].set_weights(params[2:4])
    return model, params


@pytest.mark.parametrize("relu", ["plain", "lambda", "custom"])
@pytest.mark.parametrize("fmt", ["keras", "h5", "export"])
@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_every_saved_form_loads_with_exact_maps_or_says_why(kind, fmt, relu, tmp_path):
    model, params = build(kind, relu, seed=11)
    images = np.random.default_rng(3).integers(0, 256, (4, *SHAPE), dtype=np.uint8)
    try:
        path = save_model(model, fmt, tmp_path)
    except Exception as exc:  # noqa: BLE001 - Keras itself cannot save this form: nothing of ours to load
        pytest.skip(f"Keras cannot save {kind} as {fmt}: {type(exc).__name__}")
    try:
        gbp = GuidedBackprop(path, batch_size=4, preprocessing="scale01", reduction="none", map_dtype="float32",
                             safe_mode=False)
    except ModelLoadError as exc:
        # the only accepted refusal: a clear message that names the file (no AttributeError traceback)
        assert path in str(exc) and len(str(exc)) < 600, str(exc)
        assert not (kind == "sequential" and fmt == "keras"), f"the user's path must load: {exc}"
        return
    expected, _ = reference(params, images)
    np.testing.assert_allclose(gbp.explain(images).maps[:, 0, ..., :], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert gbp.report["coverage"]["guided_total"] == 1 and gbp.report["coverage"]["unguided"] == []


def test_in_memory_subclassed_model_is_explained():
    model, params = build("subclassed", "plain", seed=12)
    images = np.random.default_rng(4).integers(0, 256, (3, *SHAPE), dtype=np.uint8)
    gbp = GuidedBackprop(model, batch_size=3, preprocessing="scale01", reduction="none", map_dtype="float32")
    expected, _ = reference(params, images)
    np.testing.assert_allclose(gbp.explain(images).maps[:, 0], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_lambda_using_a_module_its_closure_holds_loads(tmp_path):
    """``def build(): import keras; ... Lambda(lambda t: keras.ops.relu(t))``: Keras saves the closure's module as
    a dict and used to restore the dict ('dict' object has no attribute 'ops'); the module is imported again.
    (Keras cannot write such a model to .h5 at all: it fails to copy the module while saving.)"""
    model, params = build("sequential", "lambda_closure", seed=13)
    assert model.layers[2].function.__closure__, "the Lambda must hold keras in its closure"
    images = np.random.default_rng(6).integers(0, 256, (4, *SHAPE), dtype=np.uint8)
    path = save_model(model, "keras", tmp_path)
    gbp = GuidedBackprop(path, batch_size=4, preprocessing="scale01", reduction="none", map_dtype="float32",
                         safe_mode=False)
    expected, _ = reference(params, images)
    np.testing.assert_allclose(gbp.explain(images).maps[:, 0], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert gbp.report["coverage"]["guided_total"] == 1


def test_lambda_model_under_reduced_precision(tmp_path):
    """A reduced precision rebuilds the model under a dtype policy: its Lambda is rebuilt with the opt-in it was
    loaded with (it used to be refused by safe mode, even for an in-memory model)."""
    model, _ = build("sequential", "lambda", seed=14)
    path = save_model(model, "keras", tmp_path)
    for source in (model, path):
        gbp = GuidedBackprop(source, batch_size=2, preprocessing="scale01", precision="float16", safe_mode=False)
        assert gbp.source.model.layers[2].compute_dtype == "float16"
        assert gbp.report["coverage"]["guided_total"] == 1


def test_lambda_with_an_unknown_name_is_named(tmp_path):
    model = keras.Sequential([keras.Input(SHAPE), layers.Lambda(lambda t: t * numpy_alias.float32(1.0)),
                              layers.Flatten(), layers.Dense(4, activation="relu"), layers.Dense(2)])
    path = tmp_path / "odd.keras"
    model.save(str(path))
    with pytest.raises(ModelLoadError, match="numpy_alias.*import inside the function"):
        GuidedBackprop(str(path), safe_mode=False)


def test_never_called_subclassed_model_says_why():
    with pytest.raises(ModelLoadError, match="no known input shape"):
        GuidedBackprop(SubclassedMLP())
