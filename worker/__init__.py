"""Guided-backprop saliency at dataset scale for TensorFlow/Keras image classifiers.

The engine (:class:`GuidedBackprop`) knows nothing of Ray or Parquet; the batch
job in :mod:`worker.job` wires it into Ray Data.
"""

from worker.attribution import Attribution, Explanation, Gradient, GuidedBackprop, UnguidedReluError
from worker.models import ModelLoadError, UnsafeModelError, load_model
from worker.preprocessing import Preprocessing
from worker.targets import Target

__all__ = [
    "Attribution", "Explanation", "Gradient", "GuidedBackprop", "ModelLoadError", "Preprocessing",
    "Target", "UnguidedReluError", "UnsafeModelError", "load_model",
]
