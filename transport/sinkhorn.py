"""Log-domain Sinkhorn, its over-relaxation, and the certificate of potentials (docs/theory.md 5.3-5.5).

Notation: x (n, D) and y (m, D) flattened samples with weights a (n,), b (m,) (uniform a_i = 1/n,
b_j = 1/m unless given), C_ij = c(x_i, y_j) (`transport.matrix.CostMatrix`, float64, or float32
for iterations); eps > 0. Dual potentials f (n,), g (m,) (float64) define the plan

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

- Sinkhorn (log domain), alternating:  f_i <- -eps log sum_j b_j exp((g_j - C_ij) / eps),
  g_j <- -eps log sum_i a_i exp((f_i - C_ij) / eps). Before an f-update the row marginals of P
  are a_i exp((f_i - f_i^next) / eps), which gives the L1 marginal error for free. Optional
  over-relaxation f <- f + omega (f^next - f) (Thibault et al. 2017; Lehmann et al. 2021) with
  omega = 2 / (1 + sqrt(1 - rho)) from the measured contraction rate rho of plain iterations.
  On a float32 C the sums run in float32 and the potentials stay float64.
- `certify`: the certified upper bound (rounding onto the marginals) and lower bound
  (c-transforms) of `transport.certificate`, on the plan of (f, g) with uniform weights.

Exponentials are taken of arguments clamped at -700 in float64 (exp(-700) ~ 1e-304) and at -80
in float32: below about -708 (float64) or -87 (float32) the result is subnormal and torch's
vectorised exp falls back to a much slower path, while the clamped terms change sums by under
1e-300 (float64) or 1e-34 (float32) relative to the largest.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from transport.certificate import EXP_FLOOR, Certificate, certify_plan, potential_plan
from transport.costs import pairwise_cost
from transport.matrix import CostMatrix

FLOAT32_EXP_FLOOR = -80.0  # the clamp of float32 exp arguments (see the module docstring)

__all__ = ["EXP_FLOOR", "Certificate", "OverRelaxation", "certify", "sinkhorn", "sinkhorn_pass"]


def _logsumexp_(buf: Tensor, dim: int) -> Tensor:
    """log sum exp of `buf` along `dim`, using `buf` as workspace (its content is destroyed)."""
    peak = buf.amax(dim, keepdim=True)
    buf.sub_(peak).clamp_min_(EXP_FLOOR if buf.dtype == torch.float64 else FLOAT32_EXP_FLOOR).exp_()
    return buf.sum(dim).log_().add_(peak.squeeze(dim))


def sinkhorn_pass(
    C: CostMatrix, f: Tensor, g: Tensor, eps: float, omega: float = 1.0, a: Tensor | None = None, b: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """One alternating log-domain Sinkhorn iteration (f then g) in a single pass over C, with
    over-relaxation `omega` (1 = plain Sinkhorn), weights a, b (default uniform).

    Returns the new (f, g) and the L1 row-marginal error of the plan of the input (f, g).
    """
    inv = 1.0 / eps
    log_a = a.log() if a is not None else torch.full_like(f, -math.log(C.n))
    log_b = b.log() if b is not None else torch.full_like(g, -math.log(C.m))
    weight_a = a if a is not None else torch.full_like(f, 1.0 / C.n)
    f_new = torch.empty_like(f)
    err = torch.zeros((), dtype=f.dtype, device=f.device)
    g_scaled = (g * inv + log_b).to(C.x.dtype)
    acc = torch.full_like(g, -math.inf)  # log sum_i a_i exp((f_i - C_ij) / eps), accumulated over blocks
    for rows, c in C.blocks():
        buf = C.scratch(rows)
        torch.sub(g_scaled[None, :], c, alpha=inv, out=buf)  # (g_j - C_ij) / eps + log b_j, (b, m)
        fi = -eps * _logsumexp_(buf, 1).to(f.dtype)  # (b,)
        err += torch.dot(weight_a[rows], torch.expm1((f[rows] - fi) * inv).abs_())
        if omega != 1.0:
            fi = f[rows] + omega * (fi - f[rows])
        f_new[rows] = fi
        torch.sub((fi * inv + log_a[rows]).to(c.dtype)[:, None], c, alpha=inv, out=buf)  # (f_i - C_ij) / eps + log a_i
        acc = torch.logaddexp(acc, _logsumexp_(buf, 0).to(g.dtype))
    g_new = -eps * acc
    if omega != 1.0:
        g_new = g + omega * (g_new - g)
    return f_new, g_new, err.item()


def sinkhorn(
    C: CostMatrix,
    f: Tensor,
    g: Tensor,
    eps: float,
    eps_start: float | None = None,
    scaling: float = 0.5,
    marg_tol: float = 1e-4,
    max_iter: int = 1000,
    deadline: float = math.inf,
    overrelax: bool = True,
    omega: float = 1.0,
) -> tuple[Tensor, Tensor, int, float, float]:
    """eps-scaling from `eps_start` down to `eps` (one plain iteration per stage, eps *= scaling),
    then iterations at `eps` until the L1 marginal error is <= marg_tol, `max_iter` iterations
    in all, or time.perf_counter() passes `deadline`.
    Returns (f, g, iterations, marginal error, the over-relaxation omega reached).
    `overrelax` adapts the over-relaxation (`OverRelaxation`; an `omega` > 1 from a previous call
    at the same eps is used at once).
    """
    it, err = 0, math.inf
    stage = eps_start if eps_start is not None else eps
    while stage > eps and it < max_iter and time.perf_counter() < deadline:
        f, g, err = sinkhorn_pass(C, f, g, stage)
        it, stage = it + 1, stage * scaling
    relax = OverRelaxation((f, g), omega, overrelax)
    while it < max_iter and time.perf_counter() < deadline:
        f_next, g_next, err = sinkhorn_pass(C, f, g, eps, relax.omega)
        it += 1
        (f, g), diverged = relax.step(err, (f, g), (f_next, g_next))
        if err <= marg_tol and not diverged:
            break
    return f, g, it, err, relax.omega


class OverRelaxation:
    """The over-relaxation omega of a fixed-point iteration, adapted to its measured contraction.

    `step(err, state, next_state)` takes the error of the input `state` and the relaxed update, and
    returns the state to continue from. Iterations start plain (unless an `omega` > 1 from a previous
    call at the same eps is given); once 8 of them show a steady contraction rate rho < 1
    (err_k / err_{k-4} = rho^4), omega = min(omega_max, 2 / (1 + sqrt(1 - rho))), omega_max = 1.9 at
    first. The error may rise for a while before it falls under over-relaxation, so only a blow-up
    (error 20x its best, or not finite) counts as divergence: the state of the best error so far is
    restored and omega_max is halved towards 1.
    """

    def __init__(self, state: tuple[Tensor, ...], omega: float = 1.0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.omega = omega if enabled else 1.0
        self.omega_max = max(omega, 1.9) if enabled else 1.0
        self.history: list[float] = []
        self.best, self.saved = math.inf, state

    def step(
        self, err: float, state: tuple[Tensor, ...], next_state: tuple[Tensor, ...]
    ) -> tuple[tuple[Tensor, ...], bool]:
        """(the state to continue from, whether the iteration diverged and was restored)."""
        if not math.isfinite(err) or err > 20.0 * self.best:  # diverging: restore, relax less
            self.omega_max = 1.0 + (self.omega_max - 1.0) / 2.0
            self.omega, self.history = 1.0, []
            return self.saved, True
        if err < self.best:
            self.best, self.saved = err, state  # err is the error of the input state
        if self.enabled and self.omega_max > 1.05:
            self.history.append(err)
            window = 4 if self.omega == 1.0 else 10
            if len(self.history) >= 2 * window and self.history[-1 - window] > 0:
                rate = (self.history[-1] / self.history[-1 - window]) ** (1.0 / window)
                if rate < 1.0:  # plain rate from Young's relation (rate + omega - 1)^2 = rate omega^2 rho
                    rho = min(1.0, (rate + self.omega - 1.0) ** 2 / (rate * self.omega**2))
                    self.omega = max(self.omega, min(self.omega_max, 2.0 / (1.0 + math.sqrt(1.0 - rho))))
                self.history = self.history[-window:]
        return next_state, False


def certify(C: CostMatrix, f: Tensor, g: Tensor, eps: float) -> Certificate:
    """Round the plan of (f, g) (uniform weights) onto the marginals and compute both bounds and the
    entropic value (`transport.certificate.certify_plan`): two passes over C (float64)."""
    a = torch.full((C.n,), 1.0 / C.n, dtype=f.dtype, device=f.device)
    b = torch.full((C.m,), 1.0 / C.m, dtype=g.dtype, device=g.device)
    return certify_plan(C, potential_plan(f, g, eps, a, b), a, b, f, g, eps, entropic=True)


# ---- the eps-scaling warm start by geomloss ---------------------------------------------------


def geomloss_schedule_length(eps: float, cmax: float, scaling: float) -> int:
    """Number of Sinkhorn updates geomloss's legacy tensorized solver makes for this schedule:
    its list [cmax, cmax * scaling^k while > eps, eps] (p = 1), plus the final full update."""
    if eps >= cmax:
        return 3
    return 3 + math.ceil(math.log(eps / cmax) / math.log(scaling))


def geomloss_potentials(C: CostMatrix, eps: float, cmax: float, scaling: float = 0.5) -> tuple[Tensor, Tensor, int]:
    """Potentials (f, g) at temperature `eps` from geomloss's eps-scaling solve; tensorized only.

    Calls geomloss's `SamplesLoss("sinkhorn", p=1, blur=eps, diameter=cmax, scaling=scaling,
    cost=..., debias=False, potentials=True, backend="tensorized")` on the matrix C already held
    in memory. With a user cost and p = 1, geomloss's temperature is blur^p = eps on C exactly (its
    |x-y|^2 / 2 and 2 blur^2 conventions apply only to its built-in costs), its schedule runs from
    diameter^p = cmax down to eps by the factor `scaling`, and the potentials it returns (F, G)
    give the plan a_i b_j exp((F_i + G_j - C_ij) / eps): the convention of this module.

    geomloss stops after its fixed schedule, so the plan's marginals are still off (by percents in
    L1): the caller iterates further at eps before rounding. Its `online` backend would
    avoid holding C but needs pykeops, which this project does not install, so the chunked backend
    runs the same schedule with `sinkhorn(..., eps_start=cmax)` instead. (geomloss 0.3.1's newer
    `geomloss.ot.solve_sample` accepts only its "sqeuclidean" cost and a fixed iteration count.)

    Returns (f (n,), g (m,), the number of Sinkhorn updates geomloss made).
    """
    if C.full is None:
        raise ValueError("geomloss_potentials needs the tensorized backend (C held in memory).")
    from geomloss import SamplesLoss

    full = C.full  # (n, m)

    def cost(xb: Tensor, yb: Tensor) -> Tensor:  # (1, N, D), (1, M, D) -> (1, N, M)
        if xb.data_ptr() == C.x.data_ptr() and yb.data_ptr() == C.y.data_ptr():
            return full[None]
        if xb.data_ptr() == C.y.data_ptr() and yb.data_ptr() == C.x.data_ptr():
            return full.T[None]
        return pairwise_cost(xb[0], yb[0], C.cost)[None]

    loss = SamplesLoss(
        "sinkhorn", p=1, blur=eps, diameter=cmax, scaling=scaling, cost=cost,
        debias=False, potentials=True, backend="tensorized",
    )
    f, g = loss(C.x, C.y)
    return f.reshape(-1), g.reshape(-1), geomloss_schedule_length(eps, cmax, scaling)
