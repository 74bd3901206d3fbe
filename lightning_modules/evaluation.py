"""PrimalDual's evaluation aggregates as a torchmetrics `Metric` (docs/theory.md 3.4, 4.2, 4.5).

Each validation / test step adds per-sample sums of every term of the primal and the dual
(reconstruction cost, the latent critic's two terms, the data critic's raw and certified terms)
to one float64 vector of sufficient statistics with `dist_reduce_fx="sum"`, so DDP reduction and
device placement come from torchmetrics and the epoch values are exact means over every sample
of every rank: `val/gap` is then the difference of two such means, not an average of per-batch
gaps. A Gaussian encoder's (mean, log_var) are kept (`dist_reduce_fx="cat"`) for the Monte Carlo
estimate of D_f for the mixture of all the epoch's codes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

TERMS: tuple[str, ...] = (
    "recon",  # c(x, G(E(x)))
    "latent_encoded",  # g_f(T(z)) on codes
    "latent_prior",  # f*(g_f(T(z'))) on prior draws
    "dual_real",  # h(x) on held-out data
    "dual_fake",  # (lambda f)*(h(G(z))) on samples
    "certified_real",  # the same two for the critic r / max(1, Lip(r))
    "certified_fake",
)


class PrimalDualEvaluation(Metric):
    """Sums of the per-sample terms in `TERMS` and their count; `compute()` returns their means
    (float64 0-dim tensors on the metric's device) and, if codes were given, the codes of the
    epoch under "mean" and "log_var" ((N, d) each, all ranks' codes in rank order)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", default=torch.zeros(len(TERMS) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mean", default=[], dist_reduce_fx="cat")
        self.add_state("log_var", default=[], dist_reduce_fx="cat")

    def update(self, terms: dict[str, Tensor], codes: tuple[Tensor, Tensor] | None = None) -> None:
        """terms: each name of `TERMS` -> (B,) per-sample values; codes: (mean, log_var), (B, d) each."""
        batch_size = terms["recon"].shape[0]
        count = torch.tensor(batch_size, dtype=torch.float64, device=self.sums.device)
        self.sums += torch.stack([terms[name].double().sum() for name in TERMS] + [count])
        if codes is not None:
            self.mean.append(codes[0].detach())
            self.log_var.append(codes[1].detach())

    def compute(self) -> dict[str, Tensor]:
        count = self.sums[-1]
        values = dict(zip(TERMS, self.sums[:-1] / count))
        values["count"] = count
        if isinstance(self.mean, Tensor) or len(self.mean):
            values["mean"], values["log_var"] = dim_zero_cat(self.mean), dim_zero_cat(self.log_var)
        return values
