"""Attribution methods, one per module, behind :class:`worker.engine.methods.base.Attribution`."""

from worker.engine.methods.base import Attribution, Explanation, UnguidedReluError
from worker.engine.methods.deconvnet import Deconvnet
from worker.engine.methods.gradcam import GradCAM
from worker.engine.methods.gradient import Gradient
from worker.engine.methods.guided_backprop import GuidedBackprop
from worker.engine.methods.guided_gradcam import GuidedGradCAM

__all__ = ["Attribution", "Deconvnet", "Explanation", "GradCAM", "Gradient", "GuidedBackprop", "GuidedGradCAM",
           "UnguidedReluError"]
