"""DataModules: MNIST digits (offline default), cluttered MNIST, ImageNet/image folders, synthetic tensors."""

from .base import ClassificationDataModule
from .cluttered_mnist import ClutteredMNISTDataModule
from .folder import BadImageError, DataLayoutError, ImageFolderDataModule, load_rgb
from .mnist import MNISTDataModule
from .preprocess import Preprocessing, resolve_preprocessing
from .synthetic import SyntheticDataModule
from .transforms import deit_train_transform

__all__ = [
    "BadImageError",
    "ClassificationDataModule",
    "ClutteredMNISTDataModule",
    "DataLayoutError",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "Preprocessing",
    "SyntheticDataModule",
    "deit_train_transform",
    "resolve_preprocessing",
    "load_rgb",
]
