"""Lightning modules."""

from .checkpoint import LastCheckpoint
from .classifier import ImageClassifier
from .optim import OptimConfig, build_optimizer
from .reduction import TokenReductionModule

__all__ = ["ImageClassifier", "LastCheckpoint", "OptimConfig", "TokenReductionModule", "build_optimizer"]
