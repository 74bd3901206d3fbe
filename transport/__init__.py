"""Optimal transport between sample sets: pure torch maths, no Lightning (docs/theory.md section 5).

- `costs`: the cost registry (l2, l2sq, l1), per-sample and pairwise costs;
- `matrix`: cost matrices held in memory or recomputed in blocks, the memory budget and layout;
- `sinkhorn`: log-domain Sinkhorn and its over-relaxation;
- `certificate`: rounding onto the marginals and c-transforms, in float64, for any plan;
- `kernel`: float32 Sinkhorn on a held kernel (scaling form) or on recomputed blocks;
- `multiscale`: the coarse-to-fine start in low dimension;
- `solver`: the eps schedule and the certificates of the bracket;
- `exact`: exact OT through POT, and the cost model that prefers it for small problems;
- `bracket`: the certified bracket lower <= W_c <= upper (the public functions);
- `entropic`: the entropic OT loss a generator trains on (geomloss), and blur-to-eps;
- `inf_convolution`: the certified bracket on min_P' W_c(P^, P') + lambda D_f(P' || Q^), the exact
  dual side of the primal-dual link on samples.

Models, callbacks, benchmarks and studies import it; it imports nothing of theirs.
"""

from transport.bracket import WassersteinBracket, exact_wasserstein, sinkhorn_upper_bound, wasserstein_bracket
from transport.costs import COST_NAMES, METRIC_COSTS, CostName, check_cost_name, cost, flatten_samples, pairwise_cost
from transport.entropic import ENTROPIC_COSTS, OBJECTIVES, blur_to_eps, transport_loss
from transport.inf_convolution import SUPPORTED_DIVERGENCES, InfConvolutionBracket, inf_convolution_bracket

__all__ = [
    "COST_NAMES",
    "ENTROPIC_COSTS",
    "METRIC_COSTS",
    "OBJECTIVES",
    "SUPPORTED_DIVERGENCES",
    "InfConvolutionBracket",
    "CostName",
    "WassersteinBracket",
    "blur_to_eps",
    "check_cost_name",
    "cost",
    "exact_wasserstein",
    "flatten_samples",
    "inf_convolution_bracket",
    "pairwise_cost",
    "sinkhorn_upper_bound",
    "transport_loss",
    "wasserstein_bracket",
]
