"""DataModules: MNIST digits (offline default), ImageNet/image folders, synthetic tensors."""

from .base import ClassificationDataModule
from .folder import DataLayoutError, ImageFolderDataModule, deit_eval_transform, load_rgb
from .mnist import MNISTDataModule
from .synthetic import SyntheticDataModule

__all__ = [
    "ClassificationDataModule",
    "DataLayoutError",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "deit_eval_transform",
    "load_rgb",
]
