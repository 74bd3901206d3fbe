"""Drop-in callbacks for any LightningModule with `sample(num_samples)` (and `encode`/`decode`).

They import nothing of `lightning_modules/`: a module is known only through those methods and what
it logs. `base.py` holds what they share; the transport maths they report comes from `transport`
(re-exported here: `wasserstein_bracket`, `sinkhorn_upper_bound`, `WassersteinBracket`,
`inf_convolution_bracket`, `InfConvolutionBracket`).
"""

from callbacks.curves import MetricCurvesCallback
from callbacks.exact_dual import ExactDualBound, ExactDualCallback
from callbacks.fid import FIDCallback, FrechetFeatureDistance, frechet_distance
from callbacks.generalization import GeneralizationGapCallback
from callbacks.images import SampleGridCallback
from callbacks.modes import ModeCoverageCallback
from callbacks.reconstruction import LatentInterpolationCallback, ReconstructionGridCallback
from callbacks.sinkhorn import SinkhornBoundCallback, WassersteinBound
from transport import InfConvolutionBracket, WassersteinBracket, inf_convolution_bracket, sinkhorn_upper_bound, wasserstein_bracket

__all__ = [
    "ExactDualBound",
    "ExactDualCallback",
    "FIDCallback",
    "FrechetFeatureDistance",
    "GeneralizationGapCallback",
    "InfConvolutionBracket",
    "LatentInterpolationCallback",
    "MetricCurvesCallback",
    "ModeCoverageCallback",
    "ReconstructionGridCallback",
    "SampleGridCallback",
    "SinkhornBoundCallback",
    "WassersteinBound",
    "WassersteinBracket",
    "frechet_distance",
    "inf_convolution_bracket",
    "sinkhorn_upper_bound",
    "wasserstein_bracket",
]
