"""Datamodules: every batch is ``(x, y)`` with ``x`` of shape ``(B, *dims)``, images in [-1, 1].

``dims``, ``num_classes`` and ``data_range`` are known right after ``__init__`` (the CLI links
``data.dims`` into the model). Missing files raise a ``FileNotFoundError`` naming the folder.
"""

from datamodules.base import BaseDataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.toy2d import GaussianMixtureDataModule
from datamodules.vision import CelebADataModule, CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "BaseDataModule",
    "CelebADataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GaussianMixtureDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
]
