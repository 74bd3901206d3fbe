"""Drop-in callbacks for any LightningModule with `sample(num_samples)` (and `encode`/`decode`)."""

from callbacks.fid import FIDCallback, FrechetFeatureDistance, frechet_distance
from callbacks.images import SampleGridCallback
from callbacks.reconstruction import LatentInterpolationCallback, ReconstructionGridCallback

__all__ = [
    "FIDCallback",
    "FrechetFeatureDistance",
    "LatentInterpolationCallback",
    "ReconstructionGridCallback",
    "SampleGridCallback",
    "frechet_distance",
]
