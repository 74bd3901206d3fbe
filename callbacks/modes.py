"""Mode coverage of a generator on a Gaussian mixture with known centres.

For K isotropic components with centres c_1..c_K and standard deviation ``std``, every sample x
is assigned to its nearest centre k(x) = argmin_k ||x - c_k||_2, and it is a *high-quality*
sample when it lies within ``num_std`` standard deviations of that centre:

    ||x - c_k(x)||_2 <= num_std * std.

The fraction of mode k is the share of all N samples that are high-quality and assigned to k;
mode k is *covered* when that fraction is at least ``min_fraction``. The high-quality fraction is
the sum of the per-mode fractions. The defaults (3 standard deviations, 2% of the samples) are
the usual protocol for the ring of 8 Gaussians (std 0.02, radius 2) in the GAN mode-collapse
literature. Where the balls of radius num_std * std around the centres do not overlap (the ring
and the grid with their default spacing) the nearest-centre assignment changes nothing: a
high-quality sample is within the radius of exactly one centre. Where they overlap, each sample
still counts once, for its nearest centre.

Layers: `mode_coverage` and `count_covered_modes` are pure functions; `ModeCoverageCallback`
samples the model every validation epoch and logs `val/modes_covered` and
`val/high_quality_fraction`. The callback needs only `sample(num_samples)` of the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from callbacks.base import EvaluationCallback


@dataclass(frozen=True)
class ModeCoverage:
    """Result of `mode_coverage`.

    fractions: (K,) float64, share of all samples that are high-quality and nearest to mode k.
    covered: (K,) bool, fractions >= min_fraction.
    num_covered: number of covered modes.
    high_quality_fraction: share of samples within num_std * std of their nearest centre.
    counts: (K,) int64, the number of samples behind each fraction.
    """

    fractions: Tensor
    covered: Tensor
    num_covered: int
    high_quality_fraction: float
    counts: Tensor


def _check_inputs(samples: Tensor, centers: Tensor, std: float, min_fraction: float, num_std: float) -> None:
    if samples.ndim != 2 or centers.ndim != 2 or samples.shape[1] != centers.shape[1]:
        raise ValueError(
            f"mode coverage needs samples (N, D) and centers (K, D) with the same D, got "
            f"{tuple(samples.shape)} and {tuple(centers.shape)}; flatten the samples first."
        )
    if samples.shape[0] == 0 or centers.shape[0] == 0:
        raise ValueError(f"need at least one sample and one centre, got {samples.shape[0]} and {centers.shape[0]}")
    if not (std > 0 and num_std > 0):
        raise ValueError(f"std and num_std must be positive, got std={std} and num_std={num_std}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")


def mode_coverage(
    samples: Tensor,
    centers: Tensor,
    std: float,
    min_fraction: float = 0.02,
    num_std: float = 3.0,
    chunk_size: int = 65536,
) -> ModeCoverage:
    """Per-mode fractions, covered modes and the high-quality fraction of `samples` (N, D) for a
    mixture with `centers` (K, D) and per-coordinate standard deviation `std`.

    Distances are computed in float64 as ||x - c||^2 summed over coordinates (no expansion of the
    square, so points on the radius are not flipped by cancellation), `chunk_size` samples at a
    time. Non-finite samples (NaN, inf) are never high-quality.
    """
    _check_inputs(samples, centers, std, min_fraction, num_std)
    centers64 = centers.detach().to("cpu", torch.float64)  # (K, D)
    num_modes = centers64.shape[0]
    counts = torch.zeros(num_modes, dtype=torch.int64)
    radius_sq = (num_std * std) ** 2
    for start in range(0, samples.shape[0], chunk_size):
        x = samples[start : start + chunk_size].detach().to("cpu", torch.float64)  # (n, D)
        sq_dist = ((x[:, None, :] - centers64[None, :, :]) ** 2).sum(-1)  # (n, K)
        nearest_sq, nearest = sq_dist.min(dim=1)  # (n,), (n,)
        good = nearest_sq <= radius_sq  # (n,); False for NaN distances
        counts += torch.bincount(nearest[good], minlength=num_modes)
    return coverage_from_counts(counts, samples.shape[0], min_fraction)


def coverage_from_counts(counts: Tensor, num_samples: int, min_fraction: float) -> ModeCoverage:
    """`ModeCoverage` from the per-mode high-quality `counts` (K,) out of `num_samples` samples
    (lets ranks sum their counts before the fractions are taken)."""
    counts = counts.to("cpu", torch.int64)
    fractions = counts.to(torch.float64) / num_samples  # (K,)
    covered = fractions >= min_fraction
    return ModeCoverage(
        fractions=fractions,
        covered=covered,
        num_covered=int(covered.sum()),
        high_quality_fraction=float(counts.sum()) / num_samples,
        counts=counts,
    )


def count_covered_modes(
    samples: Tensor, centers: Tensor, std: float, min_fraction: float = 0.02, num_std: float = 3.0
) -> int:
    """Number of modes k with at least `min_fraction` of the samples within `num_std` * `std`
    (Euclidean distance) of c_k, each sample counted for its nearest centre. See `mode_coverage`."""
    return mode_coverage(samples, centers, std, min_fraction, num_std).num_covered


class ModeCoverageCallback(EvaluationCallback):
    """Every `every_n_epochs` validation epochs, draw `num_samples` samples on every rank and log
    `val/modes_covered` and `val/high_quality_fraction` (see `mode_coverage`) of all ranks'
    samples together: the per-mode counts are summed over ranks before the fractions are taken.
    Samples are drawn under `torch.random.fork_rng` with seed + global_rank, so training
    randomness is untouched and every evaluation sees the same noise.

    The mixture's `centers` (K, D) and `std` are passed in, or read at setup from the datamodule's
    `centers` and `std` attributes (as `GaussianMixtureDataModule` has them). Needs only
    `pl_module.sample(num_samples)`.
    """

    def __init__(
        self,
        num_samples: int = 2500,
        min_fraction: float = 0.02,
        num_std: float = 3.0,
        every_n_epochs: int = 1,
        centers: list[list[float]] | None = None,
        std: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, seed)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.min_fraction = min_fraction
        self.num_std = num_std
        self.centers = None if centers is None else torch.as_tensor(centers, dtype=torch.float64)
        self.std = std
        self.last: ModeCoverage | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = getattr(trainer, "datamodule", None)
        if self.centers is None:
            self.centers = getattr(datamodule, "centers", None)
        if self.std is None:
            self.std = getattr(datamodule, "std", None)
        if self.centers is None or self.std is None:
            raise ValueError(
                f"ModeCoverageCallback needs the mixture's centres and std: pass centers=... and std=..., "
                f"or use a datamodule with `centers` and `std` attributes (GaussianMixtureDataModule); "
                f"{type(datamodule).__name__} has {'no centers' if self.centers is None else 'no std'}."
            )
        _check_inputs(torch.zeros(1, self.centers.shape[-1]), torch.as_tensor(self.centers), float(self.std),
                      self.min_fraction, self.num_std)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = self.generate(trainer, pl_module, self.num_samples, self.num_samples).flatten(start_dim=1)  # (N, D)
        local = mode_coverage(samples, torch.as_tensor(self.centers), float(self.std), self.min_fraction, self.num_std)
        counts = pl_module.all_gather(local.counts.to(pl_module.device))  # (K,), or (world, K) under DDP
        if counts.ndim == 2:
            counts = counts.sum(dim=0)
        self.last = coverage_from_counts(counts, self.num_samples * trainer.world_size, self.min_fraction)
        # Equal on every rank; sync_dist averages equal values (exact) and is what Lightning expects.
        pl_module.log("val/modes_covered", float(self.last.num_covered), sync_dist=True)
        pl_module.log("val/high_quality_fraction", self.last.high_quality_fraction, sync_dist=True)
