"""LightningModules for the primal-dual link between f-GANs and Wasserstein autoencoders."""

from lightning_modules.base import GenerativeModule
from lightning_modules.divergences import DIVERGENCE_NAMES, FDivergence, get_divergence
from lightning_modules.fgan import FGAN
from lightning_modules.primal_dual import PrimalDual
from lightning_modules.sinkhorn_generator import SinkhornGenerator
from lightning_modules.wae import WAE

__all__ = ["DIVERGENCE_NAMES", "FDivergence", "FGAN", "GenerativeModule", "PrimalDual", "SinkhornGenerator", "WAE", "get_divergence"]
