"""Keras 2 files (``tf.keras`` before TensorFlow 2.16, today the ``tf-keras`` package), read with tf-keras.

Keras 3 cannot rebuild most of them (a ``.keras`` file's ``Functional`` class and ``batch_input_shape``, an
``.h5`` file's DepthwiseConv2D ``groups``, augmentation layers' ``rng_type``, the ``TFOpLambda`` of a
``preprocess_input`` called on a Keras tensor, ...).  tf-keras reads them natively, and the model it gives is
called on tensors inside the engine's ``tf.function`` like a Keras 3 one, so the guided override reaches its
ops just the same: no config is translated.  Which Keras wrote a file is read from the file (``keras_version``
in a ``.keras`` zip's ``metadata.json``, in an ``.h5`` file's attributes), not found by trying.

Only used through :func:`worker.engine.models.load_model`.
"""

from __future__ import annotations

import json
import sys
import zipfile

EXTRA = 'pip install "guided-saliency[keras2]"'


def writer_version(path) -> str | None:
    """The ``keras_version`` a ``.keras``/``.h5`` file records, or None where it records none."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return str(json.loads(archive.read("metadata.json")).get("keras_version") or "") or None
        import h5py

        with h5py.File(path, "r") as handle:
            version = handle.attrs.get("keras_version")
    except (OSError, KeyError, ValueError):  # not a zip/HDF5 we can read: the loader says why
        return None
    return (version.decode() if isinstance(version, bytes) else str(version)) if version is not None else None


def is_keras2(version: str | None) -> bool:
    return bool(version) and version.split(".")[0] == "2"


def installed():
    """The ``tf_keras`` module, or None when the extra is not installed."""
    try:
        import tf_keras
    except ImportError:
        return None
    return tf_keras


def is_model(model) -> bool:
    """Whether ``model`` is a tf-keras model (without importing tf-keras for anyone who never did)."""
    module = sys.modules.get("tf_keras")
    return module is not None and isinstance(model, module.Model)


def load(path: str, safe_mode: bool):
    """Load a Keras 2 file with tf-keras.

    Safe mode holds for ``.h5`` files too: tf-keras itself only checks it for ``.keras`` files, but honours
    the scope its Lambda layer reads."""
    import tf_keras
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(safe_mode):
        return tf_keras.models.load_model(path, compile=False, **({"safe_mode": safe_mode}
                                                                   if zipfile.is_zipfile(path) else {}))


def missing_extra(path, version: str, cause: str = "") -> str:
    """The one line a Keras 2 file gets when tf-keras is not installed."""
    return (f"{path} was written by Keras {version} (tf.keras before TensorFlow 2.16)"
            + (f" and Keras 3 cannot rebuild it ({cause})" if cause else "")
            + f": install the Keras 2 reader, {EXTRA}, or re-save it as a SavedModel "
            "(model.save(\"dir\") where it was trained)")


def dtype_policy(value, policy: str):
    """A tf-keras layer config's ``dtype`` under ``policy`` (a name string or a ``Policy`` dict), else None."""
    if isinstance(value, str) and (value.startswith(("float", "mixed_")) or value == "bfloat16"):
        return policy
    if isinstance(value, dict) and value.get("class_name") == "Policy":
        return {**value, "config": {**value.get("config", {}), "name": policy}}
    return None
