"""DataModules: MNIST digits (offline default), cluttered MNIST, ImageNet/image folders, synthetic tensors."""

from .base import ClassificationDataModule
from .cluttered_mnist import ClutteredMNISTDataModule
from .folder import BadImageError, DataLayoutError, ImageFolderDataModule, load_rgb, weights_relevant
from .mnist import MNISTDataModule
from .synthetic import SyntheticDataModule
from .transforms import deit_eval_transform, deit_train_transform

__all__ = [
    "BadImageError",
    "ClassificationDataModule",
    "ClutteredMNISTDataModule",
    "DataLayoutError",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "deit_eval_transform",
    "deit_train_transform",
    "load_rgb",
    "weights_relevant",
]
