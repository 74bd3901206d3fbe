"""Solver internals for the certified Wasserstein bracket (SPEC section 5): cost matrices,
log-domain Sinkhorn (held in memory or chunk by chunk), rounding onto the marginals and the
c-transform lower bound. The public functions live in `callbacks/sinkhorn.py`.

Notation: x (n, D) and y (m, D) flattened samples with uniform weights a_i = 1/n, b_j = 1/m;
C_ij = c(x_i, y_j) in float64; eps > 0. Dual potentials f (n,), g (m,) define the plan

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

- Sinkhorn (log domain), alternating:  f_i <- -eps log sum_j b_j exp((g_j - C_ij) / eps),
  g_j <- -eps log sum_i a_i exp((f_i - C_ij) / eps). After a g-update the column marginals of P
  are exact and the row marginals are a_i exp((f_i - f_i^next) / eps), which gives the L1
  marginal error for free at the next f-update.
- Rounding (Altschuler, Weed, Rigollet 2017, Algorithm 2): X = diag(min(a / r(P), 1)) P,
  Y = X diag(min(b / c(X), 1)), err_r = a - r(Y), err_c = b - c(Y) (both >= 0, equal L1 norm),
  pi = Y + err_r err_c^T / ||err_r||_1 has marginals exactly (a, b), so
  upper = <Y, C> + err_r^T C err_c / ||err_r||_1 >= W_c(a, b) whatever the iterations.
  Both scalings are potential shifts (f_i += eps min(0, log a_i - log r_i), likewise for g).
- Entropic value: <pi, C> + eps KL(pi || a x b) on the same rounded coupling, which is
  >= OT_eps(a, b) >= W_c(a, b), and equals OT_eps (debias off) at convergence.
- Lower bound (c-transform): for any g, f_i = min_j (C_ij - g_j) makes (f, g) dual-feasible, so
  sum_i a_i f_i + sum_j b_j g_j <= W_c(a, b); g'_j = min_i (C_ij - f_i) improves it. Both
  directions (from g and from f) are computed and the larger kept.

Every pass walks the row blocks of C: one block holding the whole matrix ("tensorized", C built
once and kept), or blocks of rows recomputed from x and y on each pass ("chunked": memory
O(chunk_rows * m) instead of O(n m)). The chunked path is plain torch; pykeops (an online
reduction library that geomloss can use) is not installed in this project and not needed.
The code is device-agnostic: tensors stay on the device of x (CUDA works; float64 is required).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

COST_NAMES: tuple[str, ...] = ("l2sq", "l2", "l1")
BACKENDS: tuple[str, ...] = ("auto", "tensorized", "chunked")
# "auto" switches to the chunked backend above this many matrix entries (2^25 float64 = 256 MiB).
AUTO_CHUNK_ENTRIES = 2**25
# Default chunk: this many entries per block (2^22 float64 = 32 MiB, a few temporaries of it).
CHUNK_ENTRIES = 2**22


def check_cost_name(cost: str) -> None:
    """Raise ValueError listing the valid cost names if `cost` is not one."""
    if cost not in COST_NAMES:
        raise ValueError(f"Unknown cost {cost!r}. Valid choices: {', '.join(COST_NAMES)}.")


def flatten_samples(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Validate two sample sets and return them as float64 (n, D), (m, D) on x's device.

    x: (n, ...) and y: (m, ...) with the same number of features per sample; 1-D inputs are n
    scalar samples.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}.")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"x and y must have a sample dimension, got shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"x and y must hold at least one sample each, got shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    x2 = x.reshape(x.shape[0], -1)
    y2 = y.reshape(y.shape[0], -1)
    if x2.shape[1] != y2.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features per sample: x has shape {tuple(x.shape)} "
            f"({x2.shape[1]} features), y has shape {tuple(y.shape)} ({y2.shape[1]} features)."
        )
    if x2.shape[1] == 0:
        raise ValueError(f"samples have no features: shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    x2, y2 = x2.detach().to(torch.float64), y2.detach().to(device=x.device, dtype=torch.float64)
    if not (torch.isfinite(x2).all() and torch.isfinite(y2).all()):
        raise ValueError("x and y must be finite (found NaN or inf).")
    return x2, y2


def cost_block(x: Tensor, y: Tensor, cost: str, y_sqnorm: Tensor | None = None) -> Tensor:
    """C_ij = c(x_i, y_j) for float64 rows x (b, D), y (m, D) -> (b, m).

    l2sq = ||x - y||^2 in full (expanded square, exact enough in float64), l2 = its square root,
    l1 = ||x - y||_1.
    """
    if cost == "l1":
        return torch.cdist(x, y, p=1.0)
    y_sqnorm = y.pow(2).sum(1) if y_sqnorm is None else y_sqnorm
    c = torch.addmm(y_sqnorm[None, :], x, y.T, alpha=-2.0).add_(x.pow(2).sum(1, keepdim=True)).clamp_min_(0.0)
    return c.sqrt_() if cost == "l2" else c


class CostMatrix:
    """C given by row blocks: kept in memory (`tensorized`) or recomputed per pass (`chunked`).

    x: (n, D), y: (m, D) float64 from `flatten_samples`. `chunk_size` is the number of rows per
    block of the chunked backend (default: about 2^22 entries per block).
    """

    def __init__(self, x: Tensor, y: Tensor, cost: str, backend: str = "auto", chunk_size: int | None = None) -> None:
        check_cost_name(cost)
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}. Valid choices: {', '.join(BACKENDS)}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        self.x, self.y, self.cost = x, y, cost
        self.n, self.m = x.shape[0], y.shape[0]
        if backend == "auto":
            backend = "chunked" if self.n * self.m > AUTO_CHUNK_ENTRIES else "tensorized"
        self.backend = backend
        self.chunk_size = chunk_size or max(1, CHUNK_ENTRIES // self.m)
        self._y_sqnorm = y.pow(2).sum(1)
        self._full = cost_block(x, y, cost, self._y_sqnorm) if backend == "tensorized" else None

    def blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """Yield (rows, C[rows]) covering all rows in order; C[rows] is (len(rows), m)."""
        if self._full is not None:
            yield slice(0, self.n), self._full
            return
        for start in range(0, self.n, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, self.n))
            yield rows, cost_block(self.x[rows], self.y, self.cost, self._y_sqnorm)


@dataclass
class CostStats:
    """One pass of summary statistics: max and mean cost, and the c-transform lower bound of the
    zero potential, max(mean_i min_j C_ij, mean_j min_i C_ij) <= W_c (SPEC 5)."""

    max: float
    mean: float
    nearest: float


def cost_stats(C: CostMatrix) -> CostStats:
    cmax, total = 0.0, 0.0
    row_min = torch.empty(C.n, dtype=torch.float64, device=C.x.device)
    col_min = torch.full((C.m,), math.inf, dtype=torch.float64, device=C.x.device)
    for rows, c in C.blocks():
        cmax = max(cmax, c.max().item())
        total += c.sum().item()
        row_min[rows] = c.min(1).values
        col_min = torch.minimum(col_min, c.min(0).values)
    nearest = max(row_min.mean().item(), col_min.mean().item())
    return CostStats(max=cmax, mean=total / (C.n * C.m), nearest=nearest)


def sinkhorn_pass(C: CostMatrix, f: Tensor, g: Tensor, eps: float) -> tuple[Tensor, Tensor, float]:
    """One alternating log-domain Sinkhorn iteration (f then g) in a single pass over C.

    Returns the new (f, g) and the L1 row-marginal error of the plan of the input (f, g).
    """
    log_a, log_b = -math.log(C.n), -math.log(C.m)
    f_new = torch.empty_like(f)
    acc = torch.full_like(g, -math.inf)  # log sum_i a_i exp((f_i - C_ij) / eps), accumulated over blocks
    for rows, c in C.blocks():
        fi = -eps * (torch.logsumexp((g[None, :] - c) / eps, dim=1) + log_b)  # (b,)
        f_new[rows] = fi
        acc = torch.logaddexp(acc, torch.logsumexp((fi[:, None] - c) / eps, dim=0) + log_a)
    err = torch.expm1((f - f_new) / eps).abs().sum().item() / C.n
    return f_new, -eps * acc, err


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
) -> tuple[Tensor, Tensor, int, float]:
    """eps-scaling from `eps_start` down to `eps` (one iteration per stage, eps *= scaling),
    then iterations at `eps` until the L1 marginal error is <= marg_tol, `max_iter` iterations
    in all, or time.perf_counter() passes `deadline`. Returns (f, g, iterations, marginal error)."""
    it, err = 0, math.inf
    stage = eps_start if eps_start is not None else eps
    while stage > eps and it < max_iter:
        f, g, err = sinkhorn_pass(C, f, g, stage)
        it, stage = it + 1, stage * scaling
    while it < max_iter and time.perf_counter() < deadline:
        f, g, err = sinkhorn_pass(C, f, g, eps)
        it += 1
        if err <= marg_tol:
            break
    return f, g, it, err


@dataclass
class Certificate:
    """Certified bounds from one pair of potentials (see the module docstring)."""

    lower: float  # c-transform bound, <= W_c
    upper: float  # cost of the rounded coupling, >= W_c
    entropic: float  # <pi, C> + eps KL(pi || a x b) of the rounded coupling, >= OT_eps >= W_c
    marginal_error: float  # L1 distance of the unrounded plan's marginals to (a, b)


def certify(C: CostMatrix, f: Tensor, g: Tensor, eps: float) -> Certificate:
    """Round the plan of (f, g) onto the marginals and compute both bounds: two passes over C."""
    n, m = C.n, C.m
    log_ab = -math.log(n) - math.log(m)
    # Pass 1: row sums of P -> row scaling (f1); column sums of X; c-transforms g -> f^c and f -> g^c.
    f1, f_ct = torch.empty_like(f), torch.empty_like(f)
    log_cx = torch.full_like(g, -math.inf)
    g_ct = torch.full_like(g, math.inf)
    g_ct_of_f = torch.full_like(g, math.inf)
    row_err = 0.0
    for rows, c in C.blocks():
        z = (f[rows, None] + g[None, :] - c) / eps + log_ab  # log P[rows], (b, m)
        log_r = torch.logsumexp(z, dim=1)  # (b,)
        row_err += (log_r.exp() - 1.0 / n).abs().sum().item()
        shift = (-math.log(n) - log_r).clamp_max(0.0)  # log min(a / r, 1)
        f1[rows] = f[rows] + eps * shift
        log_cx = torch.logaddexp(log_cx, torch.logsumexp(z + shift[:, None], dim=0))
        fc = (c - g[None, :]).min(1).values  # (b,) f = g^c
        f_ct[rows] = fc
        g_ct = torch.minimum(g_ct, (c - fc[:, None]).min(0).values)  # g' = (g^c)^c
        g_ct_of_f = torch.minimum(g_ct_of_f, (c - f[rows, None]).min(0).values)  # f^c
    col_err = (log_cx.exp() - 1.0 / m).abs().sum().item()  # (row scaling only lowers mass)
    g1 = g + eps * (-math.log(m) - log_cx).clamp_max(0.0)
    lower_g = f_ct.mean().item() + g_ct.mean().item()
    # Pass 2: Y = rounded-down plan; its row sums, <Y, C>, err_r^T C (an m-vector); (f^c)^c.
    err_c_pred = (1.0 / m - torch.minimum(log_cx, torch.full_like(log_cx, -math.log(m))).exp()).clamp_min(0.0)
    s_pred = err_c_pred.sum()
    cost_y, entropy = 0.0, 0.0
    err_r = torch.empty_like(f)
    col_y = torch.zeros_like(g)
    err_r_c = torch.zeros_like(g)  # err_r^T C, (m,)
    f_ct2 = torch.empty_like(f)
    for rows, c in C.blocks():
        y_blk = torch.exp((f1[rows, None] + g1[None, :] - c) / eps + log_ab)  # (b, m)
        er = (1.0 / n - y_blk.sum(1)).clamp_min(0.0)
        err_r[rows] = er
        col_y += y_blk.sum(0)
        cost_y += (y_blk * c).sum().item()
        err_r_c += er @ c
        f_ct2[rows] = (c - g_ct_of_f[None, :]).min(1).values
        if s_pred > 0:
            pi = y_blk.add_(er[:, None] * err_c_pred[None, :] / s_pred)
        else:
            pi = y_blk
        entropy += (torch.xlogy(pi, pi).sum() - log_ab * pi.sum()).item()
    lower_f = f_ct2.mean().item() + g_ct_of_f.mean().item()
    err_c = (1.0 / m - col_y).clamp_min(0.0)
    s = err_r.sum().item()
    upper = cost_y + (err_r_c @ err_c).item() / s if s > 0 else cost_y
    return Certificate(
        lower=max(lower_g, lower_f),
        upper=upper,
        entropic=upper + eps * max(entropy, 0.0),
        marginal_error=max(row_err, col_err),
    )
