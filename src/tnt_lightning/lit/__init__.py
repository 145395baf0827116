"""Lightning modules."""

from .classifier import ImageClassifier
from .optim import OptimConfig, build_optimizer
from .reduction import TokenReductionModule

__all__ = ["ImageClassifier", "OptimConfig", "TokenReductionModule", "build_optimizer"]
