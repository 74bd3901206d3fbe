"""scikit-learn's handwritten digits: the embedded, offline image dataset.

1797 real 8x8 grey images of the digits 0-9 with integer pixel values 0..16, shipped inside
scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded. They are scaled to
[-1, 1] (0 -> -1, 16 -> 1), optionally resized with bilinear interpolation (e.g. to 28 or 32
for the convolutional networks), and kept in memory as tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from datamodules.base import BaseDataModule, check_positive, check_val_test_fractions, split_dataset

DIGITS_SIZE = 8
DIGITS_MAX = 16.0


def load_digits_tensors(image_size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``x`` (N, 1, S, S) float32 in [-1, 1] and ``y`` (N,) int64 in 0..9."""
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    x = x * (2.0 / DIGITS_MAX) - 1.0  # (N, 1, 8, 8) in [-1, 1]
    if image_size != DIGITS_SIZE:
        # Bilinear weights are convex (non-negative, sum 1), so the result stays in [-1, 1].
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=image_size < DIGITS_SIZE)  # (N, 1, S, S)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)  # (N,)
    return x.contiguous(), y


class DigitsDataModule(BaseDataModule):
    """The 8x8 handwritten digits of scikit-learn, in memory, split train/val/test by ``seed``.

    Args:
        image_size: side of the returned images; 8 keeps them as they are, other sizes resize
            bilinearly. ``dims`` is ``(1, image_size, image_size)``.
        batch_size, num_workers, val_fraction, seed: see ``BaseDataModule``.
        test_fraction: share of the 1797 images held out for testing, in [0, 1).

    The data ships with scikit-learn, so there is no ``data_dir`` and no ``download``.
    """

    name = "digits"
    in_memory = True

    def __init__(
        self,
        image_size: int = DIGITS_SIZE,
        batch_size: int = 100,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction, seed=seed)
        self.save_hyperparameters()
        check_positive("image_size", image_size)
        check_val_test_fractions(val_fraction, test_fraction)
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.dims = (1, image_size, image_size)
        self.num_classes = 10

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        full = TensorDataset(*load_digits_tensors(self.image_size))
        train, val, test = split_dataset(full, [self.val_fraction, self.test_fraction], self.seed)
        return train, val, test
