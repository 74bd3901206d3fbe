"""Log-domain Sinkhorn, rounding onto the marginals and c-transforms (docs/theory.md 5.3-5.5).

Notation: x (n, D) and y (m, D) flattened samples with uniform weights a_i = 1/n, b_j = 1/m;
C_ij = c(x_i, y_j) in float64 (`transport.matrix.CostMatrix`); eps > 0. Dual potentials f (n,),
g (m,) define the plan

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

- Sinkhorn (log domain), alternating:  f_i <- -eps log sum_j b_j exp((g_j - C_ij) / eps),
  g_j <- -eps log sum_i a_i exp((f_i - C_ij) / eps). Before an f-update the row marginals of P
  are a_i exp((f_i - f_i^next) / eps), which gives the L1 marginal error for free. Optional
  over-relaxation f <- f + omega (f^next - f) (Thibault et al. 2017; Lehmann et al. 2021) with
  omega = 2 / (1 + sqrt(1 - rho)) from the measured contraction rate rho of plain iterations.
- Rounding (Altschuler, Weed, Rigollet 2017, Algorithm 2): X = diag(min(a / r(P), 1)) P,
  Y = X diag(min(b / c(X), 1)), err_r = a - r(Y), err_c = b - c(Y) (both >= 0, equal L1 norm),
  pi = Y + err_r err_c^T / ||err_r||_1 has marginals exactly (a, b), so
  upper = <Y, C> + err_r^T C err_c / ||err_r||_1 >= W_c(a, b) whatever the iterations (up to
  float64 rounding). Both scalings are potential shifts (f_i += eps min(0, log a_i - log r_i), ...).
- Entropic value: <pi, C> + eps KL(pi || a x b) on the same rounded coupling, which is
  >= OT_eps(a, b) >= W_c(a, b), and equals OT_eps (debias off) at convergence.
- Lower bound (c-transform): for any g, f_i = min_j (C_ij - g_j) makes (f, g) dual-feasible, so
  sum_i a_i f_i + sum_j b_j g_j <= W_c(a, b); g'_j = min_i (C_ij - f_i) improves it. Both
  directions (from g and from f) are computed and the larger kept.

Exponentials are taken of arguments clamped at -700 (exp(-700) ~ 1e-304): below about -708 the
result is subnormal and torch's vectorised exp falls back to a much slower path, while the
clamped terms change sums by under 1e-300 relative.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from transport.costs import pairwise_cost
from transport.matrix import CostMatrix

EXP_FLOOR = -700.0  # exp arguments are clamped here (see the module docstring)


def _logsumexp_(buf: Tensor, dim: int) -> Tensor:
    """log sum exp of `buf` along `dim`, using `buf` as workspace (its content is destroyed)."""
    peak = buf.amax(dim, keepdim=True)
    buf.sub_(peak).clamp_min_(EXP_FLOOR).exp_()
    return buf.sum(dim).log_().add_(peak.squeeze(dim))


def sinkhorn_pass(C: CostMatrix, f: Tensor, g: Tensor, eps: float, omega: float = 1.0) -> tuple[Tensor, Tensor, float]:
    """One alternating log-domain Sinkhorn iteration (f then g) in a single pass over C, with
    over-relaxation `omega` (1 = plain Sinkhorn).

    Returns the new (f, g) and the L1 row-marginal error of the plan of the input (f, g).
    """
    log_a, log_b, inv = -math.log(C.n), -math.log(C.m), 1.0 / eps
    f_new = torch.empty_like(f)
    err = torch.zeros((), dtype=f.dtype, device=f.device)
    g_scaled = g * inv
    acc = torch.full_like(g, -math.inf)  # log sum_i a_i exp((f_i - C_ij) / eps), accumulated over blocks
    for rows, c in C.blocks():
        buf = C.scratch(rows)
        torch.sub(g_scaled[None, :], c, alpha=inv, out=buf)  # (g_j - C_ij) / eps, (b, m)
        fi = -eps * (_logsumexp_(buf, 1) + log_b)  # (b,)
        err += torch.expm1((f[rows] - fi) * inv).abs().sum()
        if omega != 1.0:
            fi = f[rows] + omega * (fi - f[rows])
        f_new[rows] = fi
        torch.sub((fi * inv)[:, None], c, alpha=inv, out=buf)  # (f_i - C_ij) / eps
        acc = torch.logaddexp(acc, _logsumexp_(buf, 0) + log_a)
    g_new = -eps * acc
    if omega != 1.0:
        g_new = g + omega * (g_new - g)
    return f_new, g_new, err.item() / C.n


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


@dataclass
class Certificate:
    """Certified bounds from one pair of potentials (see the module docstring)."""

    lower: float  # c-transform bound, <= W_c
    upper: float  # cost of the rounded coupling, >= W_c
    entropic: float  # <pi, C> + eps KL(pi || a x b) of the rounded coupling, >= OT_eps >= W_c
    marginal_error: float  # L1 distance of the unrounded plan's marginals to (a, b)


def certify(C: CostMatrix, f: Tensor, g: Tensor, eps: float) -> Certificate:
    """Round the plan of (f, g) onto the marginals and compute both bounds: two passes over C."""
    n, m, inv = C.n, C.m, 1.0 / eps
    log_a, log_b = -math.log(n), -math.log(m)
    # Pass 1: row sums of P -> row scaling (f1); column sums of X; c-transforms g -> f^c and f -> g^c.
    f1, f_ct = torch.empty_like(f), torch.empty_like(f)
    col_x = torch.zeros_like(g)  # c(X), (m,)
    g_ct = torch.full_like(g, math.inf)
    g_ct_of_f = torch.full_like(g, math.inf)
    row_err = torch.zeros((), dtype=f.dtype, device=f.device)
    for rows, c in C.blocks():
        buf = C.scratch(rows)
        torch.sub(c, f[rows, None], out=buf)
        g_ct_of_f = torch.minimum(g_ct_of_f, buf.amin(0))  # f^c
        torch.sub(g[None, :], c, out=buf)  # g_j - C_ij
        fc = buf.amax(1).neg_()  # (b,) f = g^c
        f_ct[rows] = fc
        buf.add_(f[rows, None]).mul_(inv).add_(log_a + log_b)  # log P[rows], (b, m)
        peak = buf.amax(1, keepdim=True)  # (b, 1)
        buf.sub_(peak).clamp_min_(EXP_FLOOR).exp_()  # P[rows] / exp(peak)
        log_r = buf.sum(1).log_().add_(peak[:, 0])  # (b,)
        row_err += (log_r.exp() - 1.0 / n).abs().sum()
        shift = (log_a - log_r).clamp_max_(0.0)  # log min(a / r, 1)
        f1[rows] = f[rows] + eps * shift
        col_x += buf.T @ (peak[:, 0] + shift).exp()  # column sums of X[rows]
        torch.sub(c, fc[:, None], out=buf)
        g_ct = torch.minimum(g_ct, buf.amin(0))  # g' = (g^c)^c
    col_err = (col_x - 1.0 / m).abs().sum().item()  # (row scaling only lowers mass)
    log_cx = col_x.log()
    g1 = g + eps * (log_b - log_cx).clamp_max(0.0)
    lower_g = f_ct.mean().item() + g_ct.mean().item()
    # Pass 2: Y = rounded-down plan; its row sums, <Y, C>, err_r^T C (an m-vector); (f^c)^c.
    err_c_pred = (1.0 / m - col_x.clamp_max(1.0 / m)).clamp_min(0.0)
    s_pred = err_c_pred.sum()
    cost_y = torch.zeros((), dtype=f.dtype, device=f.device)
    entropy = torch.zeros((), dtype=f.dtype, device=f.device)
    err_r = torch.empty_like(f)
    col_y = torch.zeros_like(g)
    err_r_c = torch.zeros_like(g)  # err_r^T C, (m,)
    f_ct2 = torch.empty_like(f)
    for rows, c in C.blocks():
        buf = C.scratch(rows)
        torch.sub(c, g_ct_of_f[None, :], out=buf)
        f_ct2[rows] = buf.amin(1)
        torch.sub(g1[None, :], c, out=buf)
        y_blk = buf.add_(f1[rows, None]).mul_(inv).add_(log_a + log_b).clamp_min_(EXP_FLOOR).exp_()  # Y[rows], (b, m)
        er = (1.0 / n - y_blk.sum(1)).clamp_min(0.0)
        err_r[rows] = er
        col_y += y_blk.sum(0)
        cost_y += torch.dot(y_blk.reshape(-1), c.reshape(-1))
        err_r_c += er @ c
        if s_pred > 0:
            y_blk.addr_(er, err_c_pred / s_pred)  # pi[rows] = Y + err_r err_c^T / ||err_c||_1
        entropy += torch.xlogy(y_blk, y_blk).sum() - (log_a + log_b) * y_blk.sum()
    lower_f = f_ct2.mean().item() + g_ct_of_f.mean().item()
    err_c = (1.0 / m - col_y).clamp_min(0.0)
    s = err_r.sum().item()
    upper = cost_y.item() + ((err_r_c @ err_c).item() / s if s > 0 else 0.0)
    return Certificate(
        lower=max(lower_g, lower_f),
        upper=upper,
        entropic=upper + eps * max(entropy.item(), 0.0),
        marginal_error=max(row_err.item(), col_err),
    )


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
