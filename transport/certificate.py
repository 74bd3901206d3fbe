"""Certified bounds on W_c from any nonnegative plan and any potentials, in float64
(docs/theory.md 5.4-5.5).

Notation: weights a (n,), b (m,) (each summing to 1), C_ij = c(x_i, y_j) in float64 from x and y
(`transport.matrix.CostMatrix` on `flatten_samples`' copies), P >= 0 an (n, m) plan given block by
block (`PlanBlock`), f (n,), g (m,) any potentials.

- Upper bound (Altschuler, Weed, Rigollet 2017, Algorithm 2): X = diag(min(a / r(P), 1)) P,
  Y = X diag(min(b / c(X), 1)), err_r = a - r(Y), err_c = b - c(Y) (both >= 0, equal L1 norm),
  pi = Y + err_r err_c^T / ||err_r||_1 has marginals exactly (a, b), so
  upper = <Y, C> + err_r^T C err_c / ||err_r||_1 >= W_c(a, b) whatever P is (up to float64
  rounding). How P was computed (float32 iterations, a floored kernel, an unconverged plan) only
  decides how close `upper` is to W_c: every sum over P is taken here, in float64, on the very
  entries the plan block returns.
- Entropic value (on request): <pi, C> + eps KL(pi || a x b) >= OT_eps >= W_c, equal to OT_eps
  (debias off) at convergence.
- Lower bound (c-transforms): for any g, f_i = min_j (C_ij - g_j) makes (f, g) dual-feasible, so
  sum_i a_i f_i + sum_j b_j g_j <= W_c(a, b); g'_j = min_i (C_ij - f_i) improves it. Both
  directions (from g and from f) are computed and the larger kept.

Two passes over C: the first finds the row scaling and the columns of X, the second the rounded
plan's cost; each also takes one c-transform of each direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from transport.matrix import CostMatrix

EXP_FLOOR = -700.0  # float64 exp arguments are clamped here (exp(-700) ~ 1e-304, no subnormals)

# (rows, C[rows] float64 (b, m), out (b, m) float64, row factors (b,), column factors (m,)) -> the
# block of diag(row factors) P diag(column factors), written into `out` and returned.
PlanBlock = Callable[[slice, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class Certificate:
    """Certified bounds from one plan and one pair of potentials (see the module docstring)."""

    lower: float  # c-transform bound, <= W_c
    upper: float  # cost of the rounded coupling, >= W_c
    entropic: float  # <pi, C> + eps KL(pi || a x b) of the rounded coupling, >= OT_eps >= W_c (nan if not asked)
    marginal_error: float  # L1 distance of the unrounded plan's marginals to (a, b)


def potential_plan(f: Tensor, g: Tensor, eps: float, a: Tensor, b: Tensor) -> PlanBlock:
    """The Sinkhorn plan of potentials, P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), exponents
    clamped at EXP_FLOOR (float64)."""
    inv = 1.0 / eps
    f_log = f * inv + a.log()
    g_log = g * inv + b.log()

    def block(rows: slice, c: Tensor, out: Tensor, row: Tensor, col: Tensor) -> Tensor:
        torch.sub(g_log + col.log(), c, alpha=inv, out=out)
        return out.add_((f_log[rows] + row.log())[:, None]).clamp_min_(EXP_FLOOR).exp_()

    return block


def _c_transforms(c: Tensor, rows: slice, g: Tensor, f: Tensor, buf: Tensor, g_c: Tensor, f_c: Tensor) -> Tensor:
    """One block (rows, all columns) of both c-transforms: writes g^c_i = min_j c_ij - g_j for the
    block's rows into `g_c`, and returns the running column minima f^c_j = min_i c_ij - f_i
    updated with the block's rows (`f_c` holds them so far). `buf` is scratch of c's shape."""
    g_c[rows] = torch.sub(c, g[None, :], out=buf).amin(1)
    return torch.minimum(f_c, torch.sub(c, f[rows, None], out=buf).amin(0))


def certify_plan(
    C: CostMatrix, plan: PlanBlock, a: Tensor, b: Tensor, f: Tensor, g: Tensor, eps: float = 0.0, entropic: bool = False,
    lower: bool = True,
) -> Certificate:
    """Round `plan` onto (a, b) and compute both bounds (module docstring); two passes over C
    (float64). `entropic` also computes the entropic value at temperature `eps`; `lower=False`
    skips the c-transforms (the lower end is then -inf), about half of the work."""
    n, m = C.n, C.m
    ones_n = torch.ones(n, dtype=a.dtype, device=a.device)
    ones_m = torch.ones(m, dtype=b.dtype, device=b.device)
    # Pass 1: g -> g^c (rows) and f -> f^c (columns); row sums of P -> row scaling; columns of X.
    row_scale, f_of_g = torch.empty_like(a), torch.empty_like(a)
    g_of_f = torch.full_like(b, math.inf)
    col_x = torch.zeros_like(b)
    row_err = torch.zeros((), dtype=a.dtype, device=a.device)
    for rows, c in C.blocks():
        buf = C.scratch(rows)
        if lower:
            g_of_f = _c_transforms(c, rows, g, f, buf, f_of_g, g_of_f)
        p = plan(rows, c, buf, ones_n[rows], ones_m)
        r = p @ ones_m
        row_err += (r - a[rows]).abs().sum()
        scale = (a[rows] / r).nan_to_num_(nan=1.0).clamp_max_(1.0)  # min(a / r, 1); an empty row stays empty
        row_scale[rows] = scale
        col_x.addmv_(p.T, scale)
    col_scale = (b / col_x).nan_to_num_(nan=1.0).clamp_max_(1.0)
    col_err = (col_x - b).abs().sum().item()  # (row scaling only lowers mass)
    # Pass 2: Y = diag(row_scale) P diag(col_scale); its row sums, <Y, C>, err_r^T C; (g^c)^c, (f^c)^c.
    err_c_pred = (b - col_x * col_scale).clamp_min_(0.0)  # err_c, known before pass 2 up to rounding
    s_pred = err_c_pred.sum()
    err_r, f_of_gf = torch.empty_like(a), torch.empty_like(a)
    g_of_fg = torch.full_like(b, math.inf)
    col_y, err_r_c = torch.zeros_like(b), torch.zeros_like(b)
    cost_y = torch.zeros((), dtype=a.dtype, device=a.device)
    entropy = torch.zeros((), dtype=a.dtype, device=a.device)
    for rows, c in C.blocks():
        buf = C.scratch(rows)
        if lower:
            g_of_fg = _c_transforms(c, rows, g_of_f, f_of_g, buf, f_of_gf, g_of_fg)
        y_blk = plan(rows, c, buf, row_scale[rows], col_scale)
        er = (a[rows] - y_blk @ ones_m).clamp_min_(0.0)
        err_r[rows] = er
        col_y.addmv_(y_blk.T, ones_n[rows])
        cost_y += torch.dot(y_blk.reshape(-1), c.reshape(-1))
        err_r_c.addmv_(c.T, er)
        if entropic:
            if s_pred > 0:
                y_blk.addr_(er, err_c_pred / s_pred)  # pi[rows] = Y + err_r err_c^T / ||err_c||_1
            entropy += torch.xlogy(y_blk, y_blk).sum() - torch.dot(y_blk @ b.log(), ones_n[rows]) - torch.dot(
                y_blk @ ones_m, a[rows].log()
            )
    lower_bound = -math.inf
    if lower:
        lower_f = torch.dot(a, f_of_gf).item() + torch.dot(b, g_of_f).item()
        lower_bound = max(lower_f, torch.dot(a, f_of_g).item() + torch.dot(b, g_of_fg).item())
    err_c = (b - col_y).clamp_min_(0.0)
    s = err_r.sum().item()
    upper = cost_y.item() + ((err_r_c @ err_c).item() / s if s > 0 else 0.0)
    return Certificate(
        lower=lower_bound,
        upper=upper,
        entropic=upper + eps * max(entropy.item(), 0.0) if entropic else math.nan,
        marginal_error=max(row_err.item(), col_err),
    )
