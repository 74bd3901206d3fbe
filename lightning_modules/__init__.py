"""LightningModules for the primal-dual link between f-GANs and Wasserstein autoencoders.

They orchestrate; the mathematics lives in `maths` (divergences, dual values, Lipschitz bounds,
Monte Carlo D_f) and `transport` (optimal transport). Read `base.py`, then one model (`fgan.py` is
the shortest), then `primal_dual.py`.
"""

from lightning_modules.base import GenerativeModule
from lightning_modules.fgan import FGAN
from lightning_modules.primal_dual import PrimalDual
from lightning_modules.reliability import NonFiniteError
from lightning_modules.sinkhorn_generator import SinkhornGenerator
from lightning_modules.wae import WAE
from maths.divergences import DIVERGENCE_NAMES, FDivergence, get_divergence

__all__ = [
    "DIVERGENCE_NAMES",
    "FDivergence",
    "FGAN",
    "GenerativeModule",
    "NonFiniteError",
    "PrimalDual",
    "SinkhornGenerator",
    "WAE",
    "get_divergence",
]
