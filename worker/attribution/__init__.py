"""Attribution methods, one per module, behind :class:`worker.attribution.base.Attribution`."""

from worker.attribution.base import Attribution, Explanation, UnguidedReluError
from worker.attribution.deconvnet import Deconvnet
from worker.attribution.gradient import Gradient
from worker.attribution.guided_backprop import GuidedBackprop

__all__ = ["Attribution", "Deconvnet", "Explanation", "Gradient", "GuidedBackprop", "UnguidedReluError"]
