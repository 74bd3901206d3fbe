"""A critic: a network read through one row of the f-divergence registry (docs/theory.md 2.5, 3.1, 4.4).

The same object serves the data critic of the dual side (FGAN, PrimalDual; the row for lambda f)
and the latent critic of the primal side (WAE, PrimalDual; the row for f on codes). Its network
outputs a raw value r(x); the critic adds the optimal constant v0 and reads

    v(x) = r(x) + v0,   h(x) = lambda g_f(v(x) / lambda),   objective = E_P[h] - E_Q[(lambda f)*(h)],

all through the pure functions of `maths.dual`. Calling the critic returns r(x), the network alone.
The certified side (a Lipschitz bound, the certified dual value) is for data critics in l2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maths.divergences import FDivergence
from maths.dual import certified_dual_value, critic_output, dual_terms, dual_value, generator_loss, gradient_penalty
from maths.layers import eval_mode
from maths.lipschitz import empirical_lipschitz, lipschitz_upper_bound


class Critic(nn.Module):
    """`network` (B, *input_shape) -> (B,) read through the registry row `divergence`.

    Args:
        network: any module mapping a batch to one value per sample (the builders' critics, or a
            user's network; certification needs the layers `maths.lipschitz` knows).
        divergence: the row (with its scale lambda) the critic's outputs are read through.
        input_shape: one sample's shape, for the Lipschitz certificate.
        gp_weight: weight of the WGAN-GP gradient penalty in `loss` (0: none).
    """

    def __init__(
        self, network: nn.Module, divergence: FDivergence, input_shape: tuple[int, ...], gp_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.network = network
        self.divergence = divergence
        self.input_shape = tuple(input_shape)
        self.gp_weight = gp_weight

    def forward(self, x: Tensor) -> Tensor:
        """r(x), the network alone. (B, *input_shape) -> (B,)."""
        return self.network(x)

    def output(self, x: Tensor) -> Tensor:
        """v(x) = r(x) + v0, offset by the optimal constant. (B, *input_shape) -> (B,)."""
        return critic_output(self.divergence, self(x))

    def value(self, x: Tensor) -> Tensor:
        """h(x) = lambda g_f(v(x) / lambda). (B, *input_shape) -> (B,)."""
        return self.divergence.activation(self.output(x))

    def objective(self, p: Tensor, q: Tensor) -> Tensor:
        """E_P[h] - E_Q[(lambda f)*(h)] on samples p of P and q of Q: a lower estimate of
        D_{lambda f}(P || Q) for any critic, which the critic ascends."""
        return dual_value(self.divergence, self(p), self(q))

    def terms(self, p: Tensor, q: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """Per-sample terms (h on p, (lambda f)*(h) on q) of the objective, for the critic r / scale."""
        return dual_terms(self.divergence, self(p), self(q), scale)

    def loss(self, real: Tensor, fake: Tensor, gp_weight: float | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss to descend, objective, mean gradient norm at interpolates or None). With a gradient
        penalty weight > 0 (`gp_weight`, default the critic's own) the WGAN-GP penalty pulls h's
        gradient norm towards 1."""
        gp_weight = self.gp_weight if gp_weight is None else gp_weight
        objective = self.objective(real, fake)
        if gp_weight <= 0.0:
            return -objective, objective, None
        penalty, grad_norm = gradient_penalty(self.value, real, fake)
        return -objective + gp_weight * penalty, objective, grad_norm

    def generator_loss(self, fake: Tensor, kind: str = "saturating") -> Tensor:
        """The generator's side on its samples: "saturating" -E[(lambda f)*(h)], "non_saturating" -E[h]."""
        return generator_loss(self.divergence, self(fake), kind)

    # ---- certification (data critics, c = l2) --------------------------------------------------

    @torch.no_grad()
    def network_bound(self) -> float:
        """Certified upper bound on Lip(r) in l2 (product of operator norms, eval mode)."""
        with eval_mode(self.network):
            return lipschitz_upper_bound(self.network, self.input_shape)

    def lipschitz_bound(self, network_bound: float | None = None) -> float:
        """Certified bound on Lip(h): Lip(r) times the slope of g_f (inf for unbounded slopes)."""
        bound = self.network_bound() if network_bound is None else network_bound
        return bound * self.divergence.activation_lipschitz

    @torch.no_grad()
    def certified_value(self, real: Tensor, fake: Tensor, network_bound: float | None = None) -> Tensor:
        """The dual value of r / max(1, Lip(r)), in H_c for a 1-Lipschitz g_f: a certified lower
        bound on GAN_{lambda f}(real, fake; H_c) <= W_l2 (NaN for rows without a certificate)."""
        bound = self.network_bound() if network_bound is None else network_bound
        with eval_mode(self.network):
            return certified_dual_value(self.divergence, self(real), self(fake), bound)

    @torch.no_grad()
    def pair_lipschitz_estimate(self, real: Tensor, fake: Tensor) -> Tensor:
        """max |h(x) - h(y)| / ||x - y|| over the pairs (real_i, fake_i) and (real_i, real_{i-1}):
        a measured lower estimate of Lip(h) on data (eval mode)."""
        with eval_mode(self.network):
            return torch.maximum(
                empirical_lipschitz(self.value, real, fake),
                empirical_lipschitz(self.value, real, real.roll(1, dims=0)),
            )
