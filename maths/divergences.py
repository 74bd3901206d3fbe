"""The f-divergence registry (docs/theory.md section 2; Nowozin, Cseke, Tomioka, f-GAN, 2016).

For a convex f with f(1) = 0, D_f(P || Q) = E_Q[f(dP/dQ)], and for any critic T with values in
dom f*,

    D_f(P || Q) >= E_P[T] - E_Q[f*(T)],

with equality at T* = f'(dP/dQ). A critic network outputs an unconstrained v and the row's
output activation g_f maps it into dom f*: T = g_f(v). The critic loss needs f*(g_f(v)), which
is computed in a fused closed form (docs/theory.md 2.3) rather than by composing
the two maps, which overflows or cancels in float32.

Scaling (docs/theory.md 2.4): lambda f is again an f-divergence generator with

    (lambda f)*(t) = lambda f*(t / lambda),   activation lambda g_f(v / lambda),

so every row is stored once, unscaled, and `FDivergence.scale` applies lambda on top.

Conventions kept from the table: `jensen_shannon` is twice the usual JS (the one with 1/2
weights), and `gan` is 2 JS - log 4 (the one row whose f(1) = -log 4, not 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from maths.choices import check_choice

LOG2 = math.log(2.0)
Elementwise = Callable[[Tensor], Tensor]


def _outside(t: Tensor, lo: float, hi: float, closed: bool) -> Tensor:
    """Mask of t outside the interval (lo, hi), or [lo, hi] when closed."""
    if closed:
        return (t < lo) | (t > hi)
    return (t <= lo) | (t >= hi)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -LOG2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class _Row:
    """One unscaled row of the tables in docs/theory.md 2.1 and 2.3."""

    f: Elementwise
    conjugate: Elementwise  # valid inside the domain only; the caller masks the outside
    activation: Elementwise
    conjugate_of_activation: Elementwise
    domain: tuple[float, float]
    domain_closed: bool
    f_prime_one: float
    f_prime_infinity: float  # lim f(u) / u as u -> inf: the price of mass where Q has none
    activation_lipschitz: float
    neutral_output: float = 0.0  # v with g_f(v) = f'(1): the optimal critic output when P = Q


_ROWS: dict[str, _Row] = {
    "kl": _Row(
        f=lambda u: torch.xlogy(u, u),
        conjugate=lambda t: torch.exp(t - 1.0),
        activation=lambda v: v,
        conjugate_of_activation=lambda v: torch.exp(v - 1.0),
        domain=(-math.inf, math.inf),
        domain_closed=False,
        f_prime_one=1.0,
        f_prime_infinity=math.inf,
        activation_lipschitz=1.0,
        neutral_output=1.0,
    ),
    "reverse_kl": _Row(
        f=lambda u: -torch.log(u),
        conjugate=lambda t: -1.0 - torch.log(-t),
        activation=lambda v: -torch.exp(-v),
        conjugate_of_activation=lambda v: v - 1.0,
        domain=(-math.inf, 0.0),
        domain_closed=False,
        f_prime_one=-1.0,
        f_prime_infinity=0.0,
        activation_lipschitz=math.inf,
    ),
    "pearson": _Row(
        f=lambda u: (u - 1.0) ** 2,
        conjugate=lambda t: 0.25 * t**2 + t,
        activation=lambda v: v,
        conjugate_of_activation=lambda v: 0.25 * v**2 + v,
        domain=(-math.inf, math.inf),
        domain_closed=False,
        f_prime_one=0.0,
        f_prime_infinity=math.inf,
        activation_lipschitz=1.0,
    ),
    "neyman": _Row(
        f=lambda u: (1.0 - u) ** 2 / u,
        conjugate=lambda t: 2.0 - 2.0 * torch.sqrt(1.0 - t),
        activation=lambda v: -torch.expm1(-v),
        conjugate_of_activation=lambda v: -2.0 * torch.expm1(-0.5 * v),
        domain=(-math.inf, 1.0),
        domain_closed=False,
        f_prime_one=0.0,
        f_prime_infinity=1.0,
        activation_lipschitz=math.inf,
    ),
    "hellinger": _Row(
        f=lambda u: (torch.sqrt(u) - 1.0) ** 2,
        conjugate=lambda t: t / (1.0 - t),
        activation=lambda v: -torch.expm1(-v),
        conjugate_of_activation=torch.expm1,
        domain=(-math.inf, 1.0),
        domain_closed=False,
        f_prime_one=0.0,
        f_prime_infinity=1.0,
        activation_lipschitz=math.inf,
    ),
    "jensen_shannon": _Row(
        f=lambda u: torch.xlogy(u, u) - torch.xlogy(u + 1.0, (u + 1.0) / 2.0),
        # -log(2 - e^t) = -log 2 - log(1 - e^(t - log 2))
        conjugate=lambda t: -LOG2 - _log1mexp(t - LOG2),
        activation=lambda v: LOG2 - F.softplus(-v),
        conjugate_of_activation=lambda v: F.softplus(v) - LOG2,
        domain=(-math.inf, LOG2),
        domain_closed=False,
        f_prime_one=0.0,
        f_prime_infinity=LOG2,
        activation_lipschitz=1.0,
    ),
    "gan": _Row(
        f=lambda u: torch.xlogy(u, u) - torch.xlogy(u + 1.0, u + 1.0),
        conjugate=lambda t: -_log1mexp(t),
        activation=F.logsigmoid,
        conjugate_of_activation=F.softplus,
        domain=(-math.inf, 0.0),
        domain_closed=False,
        f_prime_one=-LOG2,
        f_prime_infinity=0.0,
        activation_lipschitz=1.0,
    ),
    "total_variation": _Row(
        f=lambda u: 0.5 * torch.abs(u - 1.0),
        conjugate=lambda t: t,
        activation=lambda v: 0.5 * torch.tanh(v),
        conjugate_of_activation=lambda v: 0.5 * torch.tanh(v),
        domain=(-0.5, 0.5),
        domain_closed=True,
        f_prime_one=0.0,
        f_prime_infinity=0.5,
        activation_lipschitz=0.5,
    ),
}

DIVERGENCE_NAMES: tuple[str, ...] = tuple(_ROWS)


@dataclass(frozen=True)
class FDivergence:
    """The generator lambda * f of one registry row, with its conjugate and output activation.

    All methods act elementwise on tensors and keep their dtype.
    """

    name: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice("divergence", self.name, DIVERGENCE_NAMES)
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"The divergence scale lambda must be a positive number, got {self.scale}.")

    @property
    def _row(self) -> _Row:
        return _ROWS[self.name]

    def f(self, u: Tensor) -> Tensor:
        """lambda * f(u), for u >= 0 (the density ratio dP/dQ)."""
        return self.scale * self._row.f(torch.as_tensor(u))

    def conjugate(self, t: Tensor) -> Tensor:
        """(lambda f)*(t) = lambda f*(t / lambda); +inf outside dom (lambda f)*."""
        t = torch.as_tensor(t)
        s = t / self.scale
        lo, hi = self._row.domain
        outside = _outside(s, lo, hi, self._row.domain_closed)
        inside = torch.where(outside, torch.full_like(s, self._safe_point), s)  # no NaN gradients
        value = self.scale * self._row.conjugate(inside)
        return torch.where(outside, torch.full_like(value, math.inf), value)

    @property
    def _safe_point(self) -> float:
        """A point well inside the unscaled domain, substituted where t is outside it."""
        lo, hi = self._row.domain
        if math.isfinite(lo) and math.isfinite(hi):
            return 0.5 * (lo + hi)
        return hi - 1.0 if math.isfinite(hi) else 0.0

    def activation(self, v: Tensor) -> Tensor:
        """Output activation lambda g_f(v / lambda), mapping R into dom (lambda f)*."""
        return self.scale * self._row.activation(torch.as_tensor(v) / self.scale)

    def conjugate_of_activation(self, v: Tensor) -> Tensor:
        """Fused, stable (lambda f)*(lambda g_f(v / lambda)) = lambda f*(g_f(v / lambda))."""
        return self.scale * self._row.conjugate_of_activation(torch.as_tensor(v) / self.scale)

    def variational_terms(self, v_p: Tensor, v_q: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample terms g(v_p) and f*(g(v_q)) of the variational bound (docs/theory.md 2.3)."""
        return self.activation(v_p), self.conjugate_of_activation(v_q)

    def variational_estimate(self, v_p: Tensor, v_q: Tensor) -> Tensor:
        """E_P[g(v_p)] - E_Q[f*(g(v_q))]: a lower bound on D_{lambda f}(P || Q) for any critic.

        v_p: critic outputs on samples of P, shape (N,) or (N, 1); v_q: on samples of Q.
        """
        on_p, on_q = self.variational_terms(v_p, v_q)
        return on_p.mean() - on_q.mean()

    @property
    def f_prime_one(self) -> float:
        """lambda f'(1): the optimal critic value T* when P = Q."""
        return self.scale * self._row.f_prime_one

    @property
    def neutral_output(self) -> float:
        """lambda v0 with g_f(v0) = f'(1): the critic output whose activation is the optimal
        constant critic lambda f'(1) (1 * lambda for kl, 0 for every other row). The models add it
        to their critic networks' outputs, so an untrained critic starts at the optimum for P = Q
        (a constant changes no Lipschitz constant)."""
        return self.scale * self._row.neutral_output

    @property
    def f_prime_infinity(self) -> float:
        """lambda f'(inf) = lim lambda f(u) / u: what each unit of P's mass costs where Q has none
        (docs/theory.md 2.1); inf for kl and pearson."""
        return self.scale * self._row.f_prime_infinity

    @property
    def activation_lipschitz(self) -> float:
        """sup |d/dv activation(v)|; unchanged by the scale. math.inf when unbounded."""
        return self._row.activation_lipschitz

    @property
    def is_activation_1_lipschitz(self) -> bool:
        """Whether g_f keeps a 1-Lipschitz critic 1-Lipschitz (needed for a certified dual value)."""
        return self.activation_lipschitz <= 1.0

    @property
    def domain(self) -> tuple[float, float]:
        """Endpoints of dom (lambda f)*; open, except total_variation's closed interval."""
        lo, hi = self._row.domain
        return lo * self.scale, hi * self.scale

    def scaled(self, lam: float) -> "FDivergence":
        """The same row for the generator lam * (this generator)."""
        return FDivergence(self.name, self.scale * lam)


def get_divergence(name: str, scale: float = 1.0) -> FDivergence:
    """Registry lookup; raises ValueError listing the known names for an unknown one."""
    return FDivergence(name, float(scale))
