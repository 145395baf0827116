"""Lightning modules."""

from .classifier import ImageClassifier
from .optim import OptimConfig, build_optimizer

__all__ = ["ImageClassifier", "OptimConfig", "build_optimizer"]
