"""2-D Gaussian mixtures for toy studies of mode coverage.

Two layouts of K equal-weight isotropic Gaussians with standard deviation ``std``:

- ``ring``: K centres evenly spaced on the circle of radius ``radius``,
  c_k = radius * (cos(2 pi k / K), sin(2 pi k / K));
- ``grid``: K = s^2 centres on the s x s grid spanning [-radius, radius]^2.

A sample is (x, y) with y ~ Uniform{0..K-1} the component index and x = c_y + std * N(0, I_2).
``centers`` and ``std`` are public so that evaluation code can count the covered modes.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, TensorDataset

from datamodules.base import BaseDataModule, check_positive

LAYOUTS = ("ring", "grid")


def mixture_centers(layout: str, num_modes: int, radius: float) -> torch.Tensor:
    """The (K, 2) float32 centres of the ``layout`` mixture."""
    if layout == "ring":
        angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes  # (K,)
        centers = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2)
    elif layout == "grid":
        side = math.isqrt(num_modes)
        if side * side != num_modes:
            raise ValueError(f"layout='grid' needs a perfect square num_modes (4, 9, 25, ...), got {num_modes}")
        # (s,) grid coordinates; a single mode sits at the origin (linspace would put it at -radius)
        ticks = torch.linspace(-radius, radius, side, dtype=torch.float64) if side > 1 else torch.zeros(1)
        gx, gy = torch.meshgrid(ticks, ticks, indexing="ij")  # (s, s) each
        centers = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # (K, 2)
    else:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    return centers.to(torch.float32)


def sample_mixture(centers: torch.Tensor, std: float, n: int, generator: torch.Generator) -> TensorDataset:
    """``n`` samples: x (n, 2) float32 and their component index y (n,) int64."""
    y = torch.randint(len(centers), (n,), generator=generator)  # (n,)
    noise = torch.randn(n, 2, generator=generator)  # (n, 2)
    return TensorDataset(centers[y] + std * noise, y)


class GaussianMixtureDataModule(BaseDataModule):
    """Samples of a 2-D Gaussian mixture (ring or grid), drawn once with a seeded generator.

    Args:
        layout: ``"ring"`` or ``"grid"``.
        num_modes: number of components K (a perfect square for ``grid``).
        radius: ring radius, or half the side of the grid's square.
        std: standard deviation of every component (per coordinate).
        num_samples, num_val_samples, num_test_samples: sizes of the three splits.
        batch_size, num_workers, seed: see ``BaseDataModule``.

    Each split has its own seed derived from ``seed``, so changing one split's size leaves the
    other splits' samples unchanged. ``dims = (2,)``, ``num_classes = num_modes``,
    ``data_range = None``. The data is generated, so there is no ``data_dir`` or ``download``.
    """

    name = "gaussian mixture"
    in_memory = True
    data_range = None

    def __init__(
        self,
        layout: str = "ring",
        num_modes: int = 8,
        radius: float = 2.0,
        std: float = 0.02,
        num_samples: int = 10000,
        num_val_samples: int = 1000,
        num_test_samples: int = 1000,
        batch_size: int = 100,
        num_workers: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        check_positive("num_modes", num_modes)
        check_positive("radius", radius)
        check_positive("std", std)
        check_positive("num_samples", num_samples)
        if num_val_samples < 0 or num_test_samples < 0:
            raise ValueError(f"num_val_samples and num_test_samples must be >= 0, "
                             f"got {num_val_samples} and {num_test_samples}")
        self.centers = mixture_centers(layout, num_modes, radius)  # (K, 2)
        self.std = std
        self.split_sizes = (num_samples, num_val_samples, num_test_samples)
        self.dims = (2,)
        self.num_classes = num_modes

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        seeds = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(self.seed)).tolist()
        train, val, test = (
            sample_mixture(self.centers, self.std, n, torch.Generator().manual_seed(s))
            for n, s in zip(self.split_sizes, seeds)
        )
        return train, val, test
