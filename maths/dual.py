"""The dual side as pure functions: critic values, the variational (dual) value, its certified
version, the generator's losses and the gradient penalty (docs/theory.md 2.3-2.5, 3.1, 4.4).

A critic network outputs a raw value r(x); the models add the optimal constant offset v0 of the
(scaled) registry row, `neutral_output` (lambda for kl with scale lambda, 0 for the other rows,
docs/theory.md 2.5), and read the critic through the row for lambda f:

    v(x) = r(x) + v0,    h(x) = lambda g_f(v(x) / lambda),
    dual value = E_P[h] - E_Q[(lambda f)*(h)],

a lower estimate of D_{lambda f}(P || Q) for any critic (the f-GAN's objective on the data
side, the latent critic's estimate of D_f(Q_Z || P_Z) on the primal side). On data, for a critic
in H_c (1-Lipschitz in l2 with a 1-Lipschitz g_f) it is a certified lower bound on
GAN_{lambda f}(P, Q; H_c) <= W_c(P, Q). `certified_dual_value` divides the raw output by
max(1, L) (L a certified Lipschitz bound of r) first, which puts h in H_c for every row with a
1-Lipschitz activation.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from maths.divergences import FDivergence

LipschitzMethod = Literal["spectral_norm", "gradient_penalty", "none"]
LIPSCHITZ_METHODS: tuple[str, ...] = get_args(LipschitzMethod)
GeneratorLoss = Literal["saturating", "non_saturating"]
GENERATOR_LOSSES: tuple[str, ...] = get_args(GeneratorLoss)


def critic_output(divergence: FDivergence, raw: Tensor, scale: float = 1.0) -> Tensor:
    """v = raw / scale + v0, the network's output offset by the optimal constant (docs/theory.md
    2.5) after dividing it by `scale` (a Lipschitz bound, for the certified value). (B,) -> (B,)."""
    return (raw if scale == 1.0 else raw / scale) + divergence.neutral_output


def dual_terms(divergence: FDivergence, raw_p: Tensor, raw_q: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-sample terms (h(x_i) on P's samples, (lambda f)*(h(y_j)) on Q's) of the dual value, from
    the raw critic outputs raw_p (N,) and raw_q (M,) of the critic r / scale. Returns (N,), (M,)."""
    return divergence.variational_terms(critic_output(divergence, raw_p, scale), critic_output(divergence, raw_q, scale))


def dual_value(divergence: FDivergence, raw_p: Tensor, raw_q: Tensor, scale: float = 1.0) -> Tensor:
    """E_P[h] - E_Q[(lambda f)*(h)]: a lower estimate of D_{lambda f}(P || Q) for any critic.
    raw_p: (N,) raw critic outputs on samples of P, raw_q: (M,) on samples of Q. 0-dim."""
    return divergence.variational_estimate(critic_output(divergence, raw_p, scale), critic_output(divergence, raw_q, scale))


def certified_dual_value(divergence: FDivergence, raw_p: Tensor, raw_q: Tensor, network_bound: float) -> Tensor:
    """The dual value of the critic r / max(1, L), L >= Lip(r) certified: in H_c whenever g_f is
    1-Lipschitz, so a certified lower bound on GAN_{lambda f}(P, Q; H_c) <= W_l2(P, Q). NaN when
    g_f is not 1-Lipschitz (reverse_kl, neyman, hellinger: no certificate exists)."""
    if not divergence.is_activation_1_lipschitz:
        return torch.full((), math.nan, dtype=raw_p.dtype, device=raw_p.device)
    return dual_value(divergence, raw_p, raw_q, scale=max(1.0, network_bound))


def is_dual_certified(divergence: FDivergence, network_bound: float, cost_is_metric: bool = True) -> bool:
    """Whether the critic's own dual value is a certified lower bound: a metric cost, a
    1-Lipschitz g_f and a certified bound <= 1 on the critic network."""
    return cost_is_metric and divergence.is_activation_1_lipschitz and network_bound * divergence.activation_lipschitz <= 1.0


def generator_loss(divergence: FDivergence, raw_fake: Tensor, kind: str = "saturating") -> Tensor:
    """The generator's side of the dual value on its samples: "saturating" descends
    -E_Q[(lambda f)*(h)] (the dual value's Q-dependent term), "non_saturating" descends -E_Q[h]
    (the usual trick; -log D for the gan row). raw_fake: (B,) -> 0-dim."""
    v = critic_output(divergence, raw_fake)
    if kind == "saturating":
        return -divergence.conjugate_of_activation(v).mean()
    return -divergence.activation(v).mean()


def f_at_one(divergence: FDivergence) -> float:
    """lambda f(1): 0 for every row but gan (-lambda log 4). D_f(P || Q) >= f(1) always (Jensen), so
    it is the value of the constant critic and a floor for any estimate of D_f."""
    return float(divergence.f(torch.tensor(1.0, dtype=torch.float64)))


def gradient_penalty(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """WGAN-GP penalty E[(||grad_x h(x_hat)||_2 - 1)^2] at random interpolates
    x_hat = t x + (1 - t) y, t ~ U[0, 1] per sample (Gulrajani et al. 2017).

    critic: (B, ...) -> (B,); real, fake: (B, ...). Returns (penalty, mean gradient norm), the
    penalty differentiable with respect to the critic's parameters. t is drawn on real's device.
    """
    t_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    t = torch.rand(t_shape, generator=generator, dtype=real.dtype, device=real.device)  # (B, 1, ...)
    x_hat = (t * real.detach() + (1.0 - t) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norms = torch.linalg.vector_norm(grad.flatten(start_dim=1), dim=1)  # (B,)
    return (norms - 1.0).pow(2).mean(), norms.detach().mean()
