"""Frechet distance between Gaussian fits of image features, and the FID callback (docs/theory.md 6).

For features of real images ~ N(mu1, S1) and of generated images ~ N(mu2, S2),

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2),

and tr sqrt(S1 S2) = tr sqrt(S1^{1/2} S2 S1^{1/2}): S1 S2 is similar to the symmetric positive
semi-definite matrix S1^{1/2} S2 S1^{1/2} (conjugate by S1^{1/2}), so both have the same
non-negative eigenvalues. The symmetric form needs one `eigh` of S1 and one `eigvalsh` of the
product: stable, and much faster than scipy's general `sqrtm` at d = 2048 (docs/BENCHMARKS.md).

Layers, torchmetrics-style:
- `frechet_distance` and `mean_cov`: pure functions in float64;
- `FrechetFeatureDistance`: torchmetrics' `FrechetInceptionDistance` with any feature module
  (its float64 sums with `dist_reduce_fx="sum"` are the sufficient statistics, so DDP is one sum;
  real statistics survive `reset`), computing the distance with `frechet_distance`;
- `FIDCallback`: real statistics once per run from the validation batches, generated ones from
  `pl_module.sample(n)` every `every_n_epochs` epochs, logged as `val/fid_<features>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from callbacks.features import datamodule_feature_name, load_or_train_domain_features, load_shipped_features
from callbacks.base import EvaluationCallback, check_positive


def mean_cov(feature_sum: Tensor, outer_sum: Tensor, n: int | Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from sufficient statistics, in float64.

    Args: feature_sum (d,) = sum_i f_i; outer_sum (d, d) = sum_i f_i f_i^T; n >= 2 samples.
    Returns: mu (d,) and S = (outer_sum - n mu mu^T) / (n - 1), shape (d, d).
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mu = feature_sum.double() / n
    cov = (outer_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
    return mu, cov


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float64 scalar (docs/theory.md 6).

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1^{1/2} S2 S1^{1/2}).

    Args: mu1, mu2 of shape (d,); sigma1, sigma2 symmetric positive semi-definite, shape (d, d).
    Tiny negative eigenvalues from rounding (or from a singular covariance) are clamped to 0.
    """
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected mu1, mu2 of shape (d,) and sigma1, sigma2 of shape (d, d); got "
            f"{tuple(mu1.shape)}, {tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt_s1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T  # S1^{1/2}, (d, d)
    product = sqrt_s1 @ sigma2 @ sqrt_s1
    product = (product + product.T) / 2  # symmetric up to rounding; make it exactly so
    tr_sqrt = torch.linalg.eigvalsh(product).clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt


class FrechetFeatureDistance(FrechetInceptionDistance):
    """torchmetrics' FID with any feature module, computed with `frechet_distance` (docs/theory.md 6).

    `feature` is an `nn.Module` with an int `num_features`; it receives the images passed to
    `update` exactly as given (torchmetrics converts to uint8 only for its built-in Inception).
    Real statistics are kept across `reset` by default (`reset_real_features=False`).
    """

    def __init__(self, feature: nn.Module, reset_real_features: bool = False, **kwargs: Any) -> None:
        if not isinstance(feature, nn.Module) or not isinstance(getattr(feature, "num_features", None), int):
            raise TypeError(
                "feature must be an nn.Module with an int attribute `num_features` (the length of "
                f"the feature vector it returns per image); got {type(feature).__name__}"
            )
        super().__init__(feature=feature, reset_real_features=reset_real_features, **kwargs)

    def compute(self) -> Tensor:
        """The Frechet distance between the Gaussian fits of real and fake features (float64)."""
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise RuntimeError(f"FID needs at least 2 real and 2 generated images; got {n_real} real and {n_fake} generated")
        mu_real, cov_real = mean_cov(self.real_features_sum, self.real_features_cov_sum, n_real)
        mu_fake, cov_fake = mean_cov(self.fake_features_sum, self.fake_features_cov_sum, n_fake)
        return frechet_distance(mu_real, cov_real, mu_fake, cov_fake)


class FIDCallback(EvaluationCallback):
    """Log the Frechet distance between features of validation images and model samples (docs/theory.md 6).

    Args:
        feature_extractor: "domain" (a small classifier of the datamodule's labels: the network shipped
            with the package for the digits and MNIST, else trained once on the labelled training split
            and cached in `feature_path`; logged as `val/fid_<datamodule>`, e.g. `val/fid_digits`), "inception" (InceptionV3 pool features, 2048-d, as torchmetrics and
            torch-fidelity compute them; logged as `val/fid_inception`), or an `nn.Module` with an
            int `num_features` that maps a batch exactly as the data gives it to (B, num_features)
            features (logged as `val/fid_<its feature_name attribute, else "custom">`).
        num_samples: real images (from the validation set) and generated images per evaluation,
            split over the DDP ranks.
        every_n_epochs: evaluate at the end of every n-th validation epoch (never in the sanity check).
        batch_size: images per `pl_module.sample(n)` call and per feature pass.
        seed: generated images use seed + global_rank each time (the same codes every epoch, other
            codes on every rank), under `torch.random.fork_rng` so training randomness is untouched.
        feature_path: the domain extractor's file (given: used, or trained and saved there, instead of
            the shipped network); default: the shipped network, else `<data_dir or default_root_dir>/
            fid_features_<datamodule>_<C>x<H>x<W>.pt`.
        inception_weights_path: a local InceptionV3 weights file (torchmetrics'
            `feature_extractor_weights_path`); default: the torch hub cache, downloaded at first use.
        data_range: value range of the images, mapped to [0, 255] for Inception only.

    Real statistics are computed once per run, from the first validation after the sanity check.
    Needs `pl_module.sample(num_samples) -> Tensor` (checked at `setup`).
    """

    def __init__(
        self,
        feature_extractor: str | nn.Module = "domain",
        num_samples: int = 1000,
        every_n_epochs: int = 1,
        batch_size: int = 500,
        seed: int = 0,
        feature_path: str | None = None,
        inception_weights_path: str | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__(every_n_epochs, seed)
        if isinstance(feature_extractor, str) and feature_extractor not in ("domain", "inception"):
            raise ValueError(f'feature_extractor must be "domain", "inception" or an nn.Module, got {feature_extractor!r}')
        check_positive(num_samples=num_samples, batch_size=batch_size)
        self.feature_extractor, self.num_samples, self.batch_size = feature_extractor, num_samples, batch_size
        self.feature_path, self.inception_weights_path, self.data_range = feature_path, inception_weights_path, data_range
        self.metric: FrechetFeatureDistance | None = None
        self.key: str | None = None  # e.g. "val/fid_digits", set at setup
        self.last_value: float | None = None
        self._real_added = False  # real statistics are in the metric (once per run)

    # ---- setup: the protocol, the feature extractor, the metric ---------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.metric is not None:
            return
        extractor, name = self._build_extractor(trainer)
        self.key = f"val/fid_{name}"
        self.metric = FrechetFeatureDistance(extractor.eval()).to(pl_module.device)

    def _build_extractor(self, trainer: L.Trainer) -> tuple[nn.Module, str]:
        if isinstance(self.feature_extractor, nn.Module):
            return self.feature_extractor, getattr(self.feature_extractor, "feature_name", "custom")
        if self.feature_extractor == "inception":
            from callbacks.inception import InceptionFeatures  # torch-fidelity is optional

            return InceptionFeatures.load(self.inception_weights_path, self.data_range), "inception"
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "num_classes", None) or not getattr(dm, "dims", None):
            raise ValueError(
                'FIDCallback(feature_extractor="domain") trains a classifier on the datamodule\'s labels, '
                "so it needs trainer.fit(model, datamodule=...) with a datamodule that sets `dims` and "
                f"`num_classes` (got {type(dm).__name__ if dm is not None else 'no datamodule'}). Pass "
                'feature_extractor="inception" or an nn.Module with `num_features` instead.'
            )
        name = datamodule_feature_name(dm)
        shipped = None if self.feature_path else load_shipped_features(name, tuple(dm.dims), int(dm.num_classes))
        if shipped is not None:  # digits and MNIST: the package's network, the same everywhere
            return shipped, name
        path = self.feature_path or self._default_feature_path(trainer, dm)
        return load_or_train_domain_features(dm, path, trainer), name

    @staticmethod
    def _default_feature_path(trainer: L.Trainer, dm: L.LightningDataModule) -> str:
        root = Path(getattr(dm, "data_dir", None) or trainer.default_root_dir)
        shape = "x".join(map(str, dm.dims))
        return str(root / f"fid_features_{datamodule_feature_name(dm)}_{shape}.pt")

    # ---- validation: real features once, generated features when due ---------------------

    def held_out_capacity(self, x: Tensor, trainer: L.Trainer) -> int:
        return self.per_rank(self.num_samples, trainer)

    def _update(self, images: Tensor, real: bool, device: torch.device) -> None:
        for chunk in images.split(self.batch_size):
            with torch.inference_mode():  # the metric's states stay inference tensors, whatever the Trainer's mode
                self.metric.update(chunk.to(device), real=real)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metric.to(pl_module.device)  # Lightning moves the module to its device after the `setup` hooks
        if not self._real_added and self.held_out is not None:
            self._update(self.held_out, True, pl_module.device)  # exactly as the data gives them
        self._real_added = True
        with torch.inference_mode():
            self.metric.reset()  # drops the generated side only (reset_real_features=False)
        fake = self.generate(trainer, pl_module, self.per_rank(self.num_samples, trainer), self.batch_size)
        self._update(fake, False, pl_module.device)
        try:
            with torch.inference_mode():
                value = self.metric.compute()  # syncs the float64 sums over ranks: same value everywhere
        except RuntimeError as err:
            raise RuntimeError(
                f"{type(self).__name__} could not compute {self.key}: {err}. Real images come from the "
                "validation batches of the first evaluated epoch; check that validation runs and yields "
                "at least 2 images."
            ) from err
        self.last_value = float(value)
        pl_module.log(self.key, value.float(), sync_dist=False)
