"""Drop-in callbacks for any LightningModule with `sample(num_samples)` (and `encode`/`decode`)."""

from callbacks.images import SampleGridCallback

__all__ = ["SampleGridCallback"]
from callbacks.fid import FIDCallback, FrechetFeatureDistance, frechet_distance  # noqa: E402

__all__ += ["FIDCallback", "FrechetFeatureDistance", "frechet_distance"]
