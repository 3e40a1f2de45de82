"""Guided-backprop saliency at dataset scale for TensorFlow/Keras image classifiers.

The engine (:class:`GuidedBackprop`) knows nothing of Ray or Parquet; the batch
job in :mod:`worker.job.driver` wires it into Ray Data.  Names are imported lazily so
that the decode and I/O modules (which run in CPU tasks) never import TensorFlow.
"""

import importlib

_EXPORTS = {
    "Attribution": "worker.engine.methods",
    "Deconvnet": "worker.engine.methods",
    "Explanation": "worker.engine.methods",
    "GradCAM": "worker.engine.methods",
    "Gradient": "worker.engine.methods",
    "GuidedBackprop": "worker.engine.methods",
    "GuidedGradCAM": "worker.engine.methods",
    "UnguidedReluError": "worker.engine.methods",
    "ModelLoadError": "worker.engine.models",
    "UnsafeModelError": "worker.engine.models",
    "SideEffectError": "worker.engine.allowlist",
    "load_model": "worker.engine.models",
    "Preprocessing": "worker.engine.preprocessing",
    "Target": "worker.engine.targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
