"""The data critic of the dual side, shared by `FGAN` and `PrimalDual` (SPEC sections 3 and 4).

A critic network outputs a raw value; the models add the constant `neutral_output` (lambda for kl,
0 for the other rows) so that an untrained critic sits at the optimal constant lambda f'(1), and
read the critic through the registry row for lambda f:

    v(x) = network(x) + neutral_output,    h(x) = lambda g_f(v(x) / lambda),
    dual value = E_real[h] - E_fake[(lambda f)*(h)]   (the variational estimate of D_{lambda f}).

The dual value is a certified lower bound on GAN_{lambda f}(P_real, P_fake; H_c) <= W_c only for
a critic in H_c: g_f 1-Lipschitz and a certified Lipschitz bound <= 1. `certified_dual_value`
divides the network's part by max(1, its bound) first, which puts the critic in H_c for every
1-Lipschitz g_f.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_modules.base import eval_mode
from lightning_modules.divergences import FDivergence
from lightning_modules.lipschitz import empirical_lipschitz, lipschitz_upper_bound
from lightning_modules.losses import gradient_penalty


class LipschitzCriticMixin:
    """Methods of a module with `self.critic` (B, *data_shape) -> (B,), `self.data_shape`,
    `hparams.lipschitz`, `hparams.gp_weight`, `hparams.generator_loss` and the row for lambda f as
    `critic_divergence`. Mixed in before the LightningModule base class."""

    critic_divergence: FDivergence  # each model says which of its rows is lambda f

    def _cost_is_metric(self) -> bool:
        """Whether the model's cost is one the dual value bounds (the FGAN's is always l2)."""
        return True

    # ---- the objective ------------------------------------------------------------------------

    def critic_output(self, x: Tensor) -> Tensor:
        """v(x): the critic network plus the constant `neutral_output` (lambda for kl, else 0), so
        that an untrained critic sits at the optimal constant lambda f'(1). (B, *data_shape) -> (B,)."""
        return self.critic(x) + self.critic_divergence.neutral_output

    def critic_value(self, x: Tensor) -> Tensor:
        """h(x) = lambda g_f(v(x) / lambda). (B, *data_shape) -> (B,)."""
        return self.critic_divergence.activation(self.critic_output(x))

    def critic_objective(self, real: Tensor, fake: Tensor) -> Tensor:
        """E_real[h] - E_fake[(lambda f)*(h)], through the fused stable conjugate of the activation."""
        return self.critic_divergence.variational_estimate(self.critic_output(real), self.critic_output(fake))

    def critic_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss to descend, critic objective, mean gradient norm at interpolates or None)."""
        objective = self.critic_objective(real, fake)
        if self.hparams.lipschitz != "gradient_penalty":
            return -objective, objective, None
        penalty, grad_norm = gradient_penalty(self.critic_value, real, fake)
        return -objective + self.hparams.gp_weight * penalty, objective, grad_norm

    def dual_generator_loss(self, fake: Tensor) -> Tensor:
        """Saturating: -E_fake[(lambda f)*(h)] (the dual value's G-dependent term); non-saturating:
        -E_fake[h] (the usual trick: -log D for `gan`)."""
        v = self.critic_output(fake)
        if self.hparams.generator_loss == "saturating":
            return -self.critic_divergence.conjugate_of_activation(v).mean()
        return -self.critic_divergence.activation(v).mean()

    # ---- the dual value and its certificate ---------------------------------------------------

    @torch.no_grad()
    def dual_value(self, real: Tensor, fake: Tensor) -> Tensor:
        """E_real[h] - E_fake[(lambda f)*(h)] on the given batches (critic in eval mode, so the
        spectral-norm power iterations do not move)."""
        with eval_mode(self.critic):
            return self.critic_objective(real, fake)

    def critic_lipschitz_bound(self) -> float:
        """Certified upper bound on the Lipschitz constant of h in the l2 metric: the product of
        the critic layers' operator norms times the slope of g_f (inf for unbounded slopes)."""
        return self._network_bound() * self.critic_divergence.activation_lipschitz

    def is_dual_certified(self, bound: float | None = None) -> bool:
        """Whether dual_value is a certified lower bound: a metric cost, g_f 1-Lipschitz and the
        critic's certified bound (`critic_lipschitz_bound` unless given) <= 1."""
        if not self._cost_is_metric() or not self.critic_divergence.is_activation_1_lipschitz:
            return False
        bound = self.critic_lipschitz_bound() if bound is None else bound
        return bound <= 1.0

    @torch.no_grad()
    def certified_dual_value(self, real: Tensor, fake: Tensor, network_bound: float | None = None) -> Tensor:
        """The dual value of the critic v / max(1, L(v)), which is in H_c whenever g_f is
        1-Lipschitz: a certified lower bound on GAN_{lambda f}(P_real, P_fake; H_c) <= W_l2.
        NaN when g_f is not 1-Lipschitz (reverse_kl, neyman, hellinger)."""
        divergence = self.critic_divergence
        if not divergence.is_activation_1_lipschitz:
            return torch.tensor(math.nan, device=real.device)
        scale = max(1.0, self._network_bound() if network_bound is None else network_bound)
        with eval_mode(self.critic):
            offset = divergence.neutral_output  # a constant: only the network's part is rescaled
            return divergence.variational_estimate(self.critic(real) / scale + offset, self.critic(fake) / scale + offset)

    def pair_lipschitz_estimate(self, real: Tensor, fake: Tensor) -> Tensor:
        """max |h(x) - h(y)| / ||x - y|| over the pairs (real_i, fake_i) and (real_i, real_{i-1}):
        a measured lower estimate of Lip(h) on data (eval mode)."""
        with eval_mode(self.critic):
            return torch.maximum(
                empirical_lipschitz(self.critic_value, real, fake),
                empirical_lipschitz(self.critic_value, real, real.roll(1, dims=0)),
            )

    def _network_bound(self) -> float:
        with eval_mode(self.critic):
            return lipschitz_upper_bound(self.critic, self.data_shape)
