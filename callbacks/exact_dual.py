"""The exact dual side on held-out data during training (docs/theory.md section 7): a certified bracket
on GAN_{lambda f}(P_X^, P_G^; H_c) = min over P' of W_c(P_X^, P') + lambda D_f(P' || P_G^), the value
of the best Lipschitz f-GAN critic on these samples, which no trained critic can exceed.

Beside a module's own numbers it reads as the chain: the trained critic's dual value <= link_lower
<= (exact dual) <= link_upper, and exact dual <= W_c + lambda f(1) (the `SinkhornBoundCallback`'s
bracket); the primal (an estimate) sits between the exact dual and W_c when the encoder is good.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from callbacks.sinkhorn import BracketCallback, SampleBracket
from transport.costs import METRIC_COSTS
from transport.inf_convolution import InfConvolutionBracket, check_inf_convolution_divergence, inf_convolution_bracket

LAMBDA_NAMES = ("lambda_", "lambda_scale")  # how the project's modules name lambda in their hparams


class ExactDualBound(SampleBracket):
    """The certified bracket on the exact dual between all real and fake samples seen
    (`SampleBracket`); arguments as in `transport.inf_convolution_bracket`."""

    higher_is_better = False

    def __init__(
        self, divergence: str, lambda_: float, cost: str = "l2", tol: float = 0.01, max_seconds: float | None = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_inf_convolution_divergence(divergence)
        self.divergence, self.lambda_, self.cost, self.tol, self.max_seconds = divergence, lambda_, cost, tol, max_seconds

    def solve(self, real: Tensor, fake: Tensor) -> InfConvolutionBracket:
        return inf_convolution_bracket(real, fake, self.divergence, self.lambda_, self.cost, self.tol, self.max_seconds)


def resolve_link(pl_module: L.LightningModule, callback: object, divergence: str | None, lambda_: float | None,
                 cost: str | None) -> tuple[str, float, str]:
    """(divergence, lambda, cost): the arguments given, else the module's hparams (`divergence`,
    `lambda_` or `lambda_scale`, `cost` if it is a metric, else l2, the theorem's metric)."""
    hparams = getattr(pl_module, "hparams", None) or {}
    divergence = divergence or hparams.get("divergence")
    if lambda_ is None:
        lambda_ = next((hparams[name] for name in LAMBDA_NAMES if name in hparams), None)
    if divergence is None or lambda_ is None:
        raise ValueError(
            f"{type(callback).__name__} needs the divergence and lambda of the link: pass divergence= and lambda_=, "
            f"or use a module whose hparams hold `divergence` and one of {', '.join(LAMBDA_NAMES)} "
            f"({type(pl_module).__name__} has {sorted(k for k in hparams if k in ('divergence', *LAMBDA_NAMES)) or 'neither'})."
        )
    if cost is None:
        cost = hparams.get("cost") if hparams.get("cost") in METRIC_COSTS else "l2"
    return divergence, float(lambda_), cost


class ExactDualCallback(BracketCallback):
    """Log `val/link_lower` <= GAN_{lambda f}(held-out, samples; H_c) <= `val/link_upper` (certified) and
    `val/link_num_samples` every few validation epochs, with the held-out and generated samples of
    `BracketCallback` (docs/theory.md 7).

    Args:
        num_samples: real and generated samples per evaluation, in all ranks together.
        every_n_epochs: evaluate at the end of every n-th validation epoch (never in the sanity check).
        divergence, lambda_: the link's row (kl, pearson, jensen_shannon, gan, total_variation) and lambda;
            None: the module's `hparams.divergence` and `hparams.lambda_` (or `lambda_scale`).
        cost: "l2" or "l1"; None: the module's cost if it is one of them, else "l2".
        tol: target relative width of the bracket.
        seed, batch_size: as for `SinkhornBoundCallback`.
        max_seconds: time budget of the solver per evaluation (None: none).

    Needs `pl_module.sample(num_samples) -> Tensor` (checked at `setup`).
    """

    prefix = "link"

    def __init__(
        self,
        num_samples: int = 1000,
        every_n_epochs: int = 1,
        divergence: str | None = None,
        lambda_: float | None = None,
        cost: str | None = None,
        tol: float = 0.01,
        seed: int = 0,
        batch_size: int = 500,
        max_seconds: float | None = 60.0,
    ) -> None:
        super().__init__(num_samples, every_n_epochs, seed, batch_size)
        if divergence is not None:
            check_inf_convolution_divergence(divergence)
        if lambda_ is not None and not lambda_ > 0:
            raise ValueError(f"lambda_ must be a positive number or None (the module's), got {lambda_}.")
        if cost is not None and cost not in METRIC_COSTS:
            raise ValueError(f"Unknown cost {cost!r} for the link, which needs a metric. Valid choices: {', '.join(METRIC_COSTS)}.")
        self.divergence, self.lambda_, self.cost = divergence, lambda_, cost
        self.tol, self.max_seconds = tol, max_seconds

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.metric is None:
            divergence, lambda_, cost = resolve_link(pl_module, self, self.divergence, self.lambda_, self.cost)
            self.metric = ExactDualBound(divergence, lambda_, cost, self.tol, self.max_seconds)
