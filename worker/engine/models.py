"""Loading a model into something the engine can trace: a :class:`ModelSource`.

Supported: an in-memory ``keras.Model`` or tf-keras model, Keras 3 ``.keras`` files, legacy
``.h5`` files, Keras 2 ``.keras``/``.h5`` files (read with tf-keras, the ``keras2`` extra: see
:mod:`worker.engine.keras2`), and TensorFlow SavedModel directories -- including exports with no
Python class behind them (``model.export(...)``, TF1/TF2 ``tf.saved_model.save``).
A SavedModel is frozen (variables become constants) and its function calls are
inlined, so its graph can be imported op by op where the guided override reaches
every ReLU.

What loading a SavedModel may run (its resources' and saveables' functions, TF1 init and restore ops, ...) is
checked against :mod:`worker.engine.allowlist` before it is loaded
(:func:`~worker.engine.allowlist.check_saved_model`).

Keras safe mode stays on: a model that carries Python code (``Lambda`` layers,
pickled functions) is refused unless ``safe_mode=False`` (CLI:
``--allow-unsafe-deserialization``) is passed for a model you trust.  Keras
restores a Lambda's bytecode without the module names it used; the usual ones
(``tf``, ``keras``, ``np``, ``ops``) are provided, so ``Lambda(lambda t:
tf.nn.relu(t))`` loads, a module the Lambda's closure holds (``import keras`` inside the function that
built the model) is imported again, and any other missing name is reported as such.  A model
that still cannot be rebuilt, or is not an image classifier, fails with a
:class:`ModelLoadError`, never an unexplained traceback.

Examples:
    >>> import keras
    >>> m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
    ...                       keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    >>> src = load_model(m)
    >>> (src.input_size, src.channels, src.num_classes)
    ((8, 8), 3, 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from worker.engine import keras2
from worker.engine.errors import describe_error
from worker.engine.fingerprint import hash_path
from worker.engine.options import check_choices

UNSAFE_OPT_IN = "safe_mode=False (CLI: --allow-unsafe-deserialization)"
SUPPORTED = (
    "supported models: one image input of shape (batch, H, W, 1 or 3) and one output of "
    "shape (batch, classes); for a model with several outputs pass output=<index>"
)


class ModelLoadError(ValueError):
    """The model could not be loaded or is not an image classifier we can explain."""


class UnsafeModelError(ModelLoadError):
    """The model carries Python code and safe mode is on."""


class ModelSource:
    """A model reduced to what the engine needs: a graph-mode forward pass and its shapes."""

    kind: str = ""
    input_size: tuple[int, int]
    channels: int
    num_classes: int
    input_dtype: tf.DType = tf.float32

    def forward(self, x: tf.Tensor, layer: str | None = None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """Trace the model on ``x``; return (class output, activation of ``layer`` or None)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "input_size": list(self.input_size),
            "channels": self.channels,
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint(),
        }


def _shape_checks(input_shape, output_shape, input_size):
    if len(input_shape) != 4:
        raise ModelLoadError(f"model input has shape {tuple(input_shape)}, not an image batch; {SUPPORTED}")
    channels = input_shape[3]
    if channels not in (1, 3):
        raise ModelLoadError(f"model input has {channels} channels; {SUPPORTED}")
    if len(output_shape) != 2:
        raise ModelLoadError(
            f"model output has shape {tuple(output_shape)}, not (batch, classes): it is not an image "
            f"classifier; {SUPPORTED}"
        )
    size = tuple(input_shape[1:3])
    if None in size:
        if input_size is None:
            raise ModelLoadError("model input has no fixed size: pass input_size=(H, W)")
        size = tuple(input_size)
    elif input_size is not None and tuple(input_size) != size:
        raise ModelLoadError(f"input_size {tuple(input_size)} differs from the model's fixed size {size}")
    return (int(size[0]), int(size[1])), int(channels), int(output_shape[1])


class KerasSource(ModelSource):
    """An in-memory Keras model (Keras 3, or tf-keras: ``kind`` says which), traced by calling it."""

    kind = "keras"

    def __init__(self, model, *, output: int | None = None, input_size=None, precision: str = "float32"):
        keras = _keras_of(model)
        if keras.__name__ == "tf_keras":
            self.kind = "tf_keras"
        if len(model.inputs) != 1:
            raise ModelLoadError(f"model has {len(model.inputs)} inputs; {SUPPORTED}")
        if len(model.outputs) != 1 and output is None:
            raise ModelLoadError(f"model has {len(model.outputs)} outputs; {SUPPORTED}")
        if output is not None and not 0 <= output < len(model.outputs):
            raise ModelLoadError(f"output={output} but the model has {len(model.outputs)} outputs")
        self._fingerprint = _hash_weights(model)
        if precision != "float32":
            model = _with_dtype_policy(model, "mixed_" + precision)
        self.model = model
        self._output = output or 0
        self.input_size, self.channels, self.num_classes = _shape_checks(
            model.inputs[0].shape, model.outputs[self._output].shape, input_size
        )
        self._keras = keras
        self._layer_models: dict[str, object] = {}

    def layer_model(self, name: str):
        if name not in self._layer_models:
            try:
                layer = self.model.get_layer(name)
            except ValueError:
                names = [lay.name for lay in self.model.layers]
                raise ValueError(f"layer {name!r} does not exist; layers are: {', '.join(names)}") from None
            self._layer_models[name] = self._keras.Model(
                self.model.inputs, [self.model.outputs[self._output], layer.output]
            )
        return self._layer_models[name]

    def forward(self, x, layer=None):
        if layer is None:
            out = self.model(x, training=False)
            if isinstance(out, (list, tuple)):
                out = out[self._output]
            return out, None
        out, act = self.layer_model(layer)(x, training=False)
        return out, act

    def fingerprint(self):
        return self._fingerprint


class SavedModelSource(ModelSource):
    """A SavedModel signature, frozen and inlined, imported op by op when traced."""

    kind = "saved_model"

    def __init__(self, path: str, *, signature: str | None = None, output: int | None = None, input_size=None,
                 allow_side_effects: bool = False):
        from tensorflow.python.framework import convert_to_constants

        from worker.engine.allowlist import check_saved_model

        self.path = str(path)
        self.load_ops = check_saved_model(self.path, allow_side_effects=allow_side_effects)
        try:
            loaded = tf.saved_model.load(self.path)
        except Exception as exc:  # noqa: BLE001 - TF raises many types here
            raise ModelLoadError(f"{self.path} is not a loadable SavedModel: {exc}") from exc
        signatures = dict(getattr(loaded, "signatures", {}) or {})
        if not signatures:
            raise ModelLoadError(f"{self.path} has no signatures to explain; export it with a serving signature")
        name = signature or ("serving_default" if "serving_default" in signatures else sorted(signatures)[0])
        if name not in signatures:
            raise ModelLoadError(f"signature {name!r} not found; available: {sorted(signatures)}")
        fn = signatures[name]
        frozen = convert_to_constants.convert_variables_to_constants_v2(fn)
        graph_def = frozen.graph.as_graph_def()
        inputs = [t for t in frozen.inputs if t.dtype != tf.resource]
        if len(inputs) != 1:
            raise ModelLoadError(f"signature {name!r} has {len(inputs)} inputs; {SUPPORTED}")
        self._graph_def = _placeholder_as_constant(graph_def, inputs[0].op.name)
        outputs = list(frozen.outputs)
        if len(outputs) != 1 and output is None:
            raise ModelLoadError(f"signature {name!r} has {len(outputs)} outputs; {SUPPORTED}")
        self._input_name = inputs[0].name
        self._output_name = outputs[output or 0].name
        self.input_dtype = inputs[0].dtype
        self.input_size, self.channels, self.num_classes = _shape_checks(
            inputs[0].shape, outputs[output or 0].shape, input_size
        )
        self.signature = name
        self._fingerprint = hash_path(self.path)

    def forward(self, x, layer=None):
        if layer is not None:
            raise ValueError("layer targets need a Keras model (.keras, .h5 or in-memory); this is a SavedModel")
        (out,) = tf.graph_util.import_graph_def(
            self._graph_def,
            input_map={self._input_name: tf.cast(x, self.input_dtype)},
            return_elements=[self._output_name],
            name="model",
        )
        return out, None

    def fingerprint(self):
        return self._fingerprint


def _placeholder_as_constant(graph_def, name: str):
    """The input Placeholder as a scalar constant: ``input_map`` replaces every use of it when the graph is
    imported, but the node itself would still be imported, and XLA cannot compile a Placeholder inside a
    function (``jit_compile=True``, the GPU default)."""
    from tensorflow.core.framework import attr_value_pb2, node_def_pb2

    out = type(graph_def)()
    out.CopyFrom(graph_def)
    for i, node in enumerate(out.node):
        if node.name == name and node.op == "Placeholder":
            dtype = tf.as_dtype(node.attr["dtype"].type)
            const = node_def_pb2.NodeDef(name=name, op="Const")
            const.attr["dtype"].CopyFrom(attr_value_pb2.AttrValue(type=dtype.as_datatype_enum))
            const.attr["value"].CopyFrom(attr_value_pb2.AttrValue(
                tensor=tf.make_tensor_proto(np.zeros((), dtype.as_numpy_dtype))))
            out.node[i].CopyFrom(const)
    return out


def load_model(model, *, safe_mode: bool = True, output: int | None = None, signature: str | None = None,
               input_size=None, precision: str = "float32", allow_side_effects: bool = False) -> ModelSource:
    """Open ``model`` (a keras.Model or tf-keras model, a .keras/.h5 file or a SavedModel directory)."""
    import keras

    check_choices(precision=precision)
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, keras.Model) or keras2.is_model(model):
        return KerasSource(_with_inputs(model, "the model"), output=output, input_size=input_size,
                           precision=precision)
    path = Path(os.fspath(model))
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
            raise ModelLoadError(f"{path} is a directory without saved_model.pb: not a SavedModel")
        if precision != "float32":
            raise ValueError("precision other than float32 needs a Keras model (.keras, .h5 or in-memory)")
        return SavedModelSource(str(path), signature=signature, output=output, input_size=input_size,
                                allow_side_effects=allow_side_effects)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelLoadError(f"{path} is not a model file: expected .keras, .h5 or a SavedModel directory")
    version = keras2.writer_version(path)
    keras2_file = keras2.is_keras2(version)
    use_tf_keras = keras2_file and keras2.installed() is not None
    # a Keras 2 file is read by tf-keras; without it, only a legacy .h5 has a chance in Keras 3
    if keras2_file and not use_tf_keras and path.suffix != ".h5":
        raise ModelLoadError(keras2.missing_extra(path, version))
    try:
        with contextlib.nullcontext() if safe_mode else _lambda_code(use_tf_keras):
            loaded = (keras2.load(str(path), safe_mode) if use_tf_keras
                      else keras.saving.load_model(str(path), compile=False, safe_mode=safe_mode))
    except Exception as exc:  # noqa: BLE001 - keras raises many types for a bad file
        text = str(exc)
        if "safe_mode" in text or "unsafe_deserialization" in text:
            raise UnsafeModelError(
                f"{path} carries Python code (e.g. a Lambda layer) and Keras safe mode is on. "
                f"Only for a model you trust, pass {UNSAFE_OPT_IN}."
            ) from exc
        if keras2_file and not use_tf_keras:
            cause = describe_error(exc).split(" using config=")[0][:160]  # not Keras's dump of the config
            raise ModelLoadError(keras2.missing_extra(path, version, cause)) from exc
        raise ModelLoadError(f"{path} could not be loaded as a Keras model: {describe_error(exc)}") from exc
    try:
        source = KerasSource(_with_inputs(loaded, path), output=output, input_size=input_size, precision=precision)
        source.path = str(path)
        return source
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unusual model must not end in a bare traceback
        raise ModelLoadError(f"{path} loaded, but could not be used as an image classifier: "
                             f"{describe_error(exc)}; {SUPPORTED}") from exc


@contextlib.contextmanager
def _lambda_code(tf_keras: bool = False):
    """While a model that may carry Lambda code is loaded (safe mode off), give that code its module names.

    Keras 3 rebuilds a Lambda's function from its bytecode with the globals of its own ``python_utils`` module,
    where ``tf``, ``keras`` and ``np`` do not exist: the model then fails while Keras rebuilds it (a Sequential
    silently stays without inputs).  Only names that module does not define are added, for good: the
    function keeps those globals (tf-keras gives its Lambdas ``tf`` and ``np`` itself).  A Lambda written
    inside the function that built the model (``def build(): import keras; ... Lambda(lambda t:
    keras.ops.relu(t))``) holds ``keras`` in its closure instead; Keras 3 and tf-keras save the cell as
    ``{"class_name": "module", "config": "keras", ...}`` and would restore that dict as its value (``'dict'
    object has no attribute 'ops'`` when the layer is called): the module is imported again."""
    try:
        if tf_keras:
            from tf_keras.src.utils import generic_utils as utils
        else:
            from keras.src.utils import python_utils as utils
    except ImportError:  # a Keras without that module: nothing to patch
        yield
        return
    if not tf_keras:
        import keras

        for name, module in {"tf": tf, "keras": keras, "np": np, "ops": keras.ops}.items():
            utils.__dict__.setdefault(name, module)
    original = utils.func_load

    def func_load(code, defaults=None, closure=None, globs=None):
        if isinstance(code, (tuple, list)):  # a whole dump: (code, defaults, closure)
            code, defaults, closure = code
        if closure is not None:
            closure = [importlib.import_module(c["config"]) if _is_module_cell(c) else c for c in closure]
        defaults = tuple(defaults) if isinstance(defaults, list) else defaults
        return original(code, defaults=defaults, closure=closure, globs=globs)

    utils.func_load = func_load
    try:
        yield
    finally:
        utils.func_load = original


def _is_module_cell(cell) -> bool:
    return (isinstance(cell, dict) and cell.get("class_name") == "module" and cell.get("module") == "builtins"
            and isinstance(cell.get("config"), str))


def _with_inputs(model, where):
    """A model with symbolic inputs.  A subclassed model has none, and a Sequential that Keras could not
    rebuild on load has none either: wrap it in a functional model on an ``Input`` of its built shape, so it
    works, or the failing layer (e.g. a Lambda's NameError) is named."""
    keras = _keras_of(model)
    try:
        if model.inputs:
            return model
    except (AttributeError, ValueError):  # subclassed, or "Sequential model ... has no defined inputs yet"
        pass
    shape = None
    if isinstance(model, keras.Sequential):
        config = model.get_config()
        first = (config.get("layers") or [{}])[0]
        shape = first.get("config", {}).get("batch_shape") if first.get("class_name") == "InputLayer" else None
        shape = shape or config.get("build_input_shape")
    elif model.built:
        shape = (model.get_build_config() or {}).get("input_shape")
    if not shape or not isinstance(shape[0], (int, type(None))):
        raise ModelLoadError(f"{where}: the model has no known input shape (a subclassed model never called, or a "
                             "Sequential without keras.Input); call it once on a batch, or start it with "
                             "keras.Input((H, W, C)), and save it again")
    layers = model.layers if isinstance(model, keras.Sequential) else [model]
    try:
        x = inputs = keras.Input(batch_shape=(None, *tuple(shape)[1:]))
        for layer in layers:
            x = layer(x)
    except Exception as exc:  # noqa: BLE001
        root = exc
        while (root.__cause__ or root.__context__) is not None:  # Keras wraps the layer's own error
            root = root.__cause__ or root.__context__
        raise ModelLoadError(
            f"{where}: the model could not be rebuilt on an input of shape {tuple(shape)[1:]}: layer "
            f"{layer.name!r} failed: {describe_error(root)}" + (
                " (a Lambda's code runs without the names of the module it was written in; import inside the "
                "function, or use a custom layer)" if isinstance(root, NameError) else "")) from exc
    return keras.Model(inputs, x, name=model.name)


def _keras_of(model):
    """The Keras a model belongs to: ``tf_keras`` for a tf-keras model, else Keras 3."""
    if keras2.is_model(model):
        import tf_keras

        return tf_keras
    import keras

    return keras


def _hash_weights(model) -> str:
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update((getattr(weight, "path", None) or weight.name).encode())
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy())).tobytes())
    return "sha256:" + digest.hexdigest()


def _with_dtype_policy(model, policy: str):
    """Rebuild ``model`` with every layer under ``policy`` (e.g. mixed_bfloat16), same weights.

    A Lambda's code is already in memory (from a file only if safe mode was off), so it is rebuilt from its
    config with safe mode off and the names :func:`_lambda_code` gives it."""
    keras2_config = keras2.is_model(model)  # a tf-keras layer's ``dtype`` is a name or a ``Policy``

    def rewrite(node):
        if isinstance(node, dict):
            if node.get("class_name") == "InputLayer":
                return node
            out = {}
            for key, value in node.items():
                if key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
                    value = {**value, "config": {**value["config"], "name": policy}}
                elif key == "dtype" and keras2_config:
                    value = keras2.dtype_policy(value, policy) or value
                out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    if keras2_config:
        from tf_keras.src.saving.serialization_lib import SafeModeScope
    else:
        from keras.src.saving.serialization_lib import SafeModeScope
    try:
        with SafeModeScope(False), _lambda_code(keras2_config):
            clone = model.__class__.from_config(rewrite(model.get_config()))
        clone.set_weights(model.get_weights())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not rebuild the model under {policy}: {exc}") from exc
    return clone
