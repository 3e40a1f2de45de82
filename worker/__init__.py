"""Guided-backprop saliency at dataset scale for TensorFlow/Keras image classifiers.

The engine (:class:`GuidedBackprop`) knows nothing of Ray or Parquet; the batch
job in :mod:`worker.job` wires it into Ray Data.  Names are imported lazily so
that the decode and I/O modules (which run in CPU tasks) never import TensorFlow.
"""

import importlib

_EXPORTS = {
    "Attribution": "worker.attribution",
    "Deconvnet": "worker.attribution",
    "Explanation": "worker.attribution",
    "Gradient": "worker.attribution",
    "GuidedBackprop": "worker.attribution",
    "UnguidedReluError": "worker.attribution",
    "ModelLoadError": "worker.models",
    "UnsafeModelError": "worker.models",
    "load_model": "worker.models",
    "Preprocessing": "worker.preprocessing",
    "Target": "worker.targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
