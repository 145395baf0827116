"""DataModules: MNIST digits (offline default), ImageNet/image folders, synthetic tensors."""

from .base import ClassificationDataModule
from .folder import BadImageError, DataLayoutError, ImageFolderDataModule, load_rgb, weights_relevant
from .mnist import MNISTDataModule
from .synthetic import SyntheticDataModule
from .transforms import deit_eval_transform, deit_train_transform

__all__ = [
    "BadImageError",
    "ClassificationDataModule",
    "DataLayoutError",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "deit_eval_transform",
    "deit_train_transform",
    "load_rgb",
    "weights_relevant",
]
