"""Drop-in callbacks for any LightningModule with `sample(num_samples)` (and `encode`/`decode`)."""

from callbacks.curves import MetricCurvesCallback
from callbacks.fid import FIDCallback, FrechetFeatureDistance, frechet_distance
from callbacks.generalization import GeneralizationGapCallback
from callbacks.images import SampleGridCallback
from callbacks.modes import ModeCoverageCallback
from callbacks.reconstruction import LatentInterpolationCallback, ReconstructionGridCallback
from callbacks.sinkhorn import SinkhornBoundCallback, WassersteinBound, sinkhorn_upper_bound, wasserstein_bracket

__all__ = [
    "FIDCallback",
    "FrechetFeatureDistance",
    "GeneralizationGapCallback",
    "LatentInterpolationCallback",
    "MetricCurvesCallback",
    "ModeCoverageCallback",
    "ReconstructionGridCallback",
    "SampleGridCallback",
    "SinkhornBoundCallback",
    "WassersteinBound",
    "frechet_distance",
    "sinkhorn_upper_bound",
    "wasserstein_bracket",
]
