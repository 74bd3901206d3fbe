"""Sinkhorn on a float32 kernel held in memory, and on blocks of C recomputed each pass
(docs/theory.md 5.3).

Both engines iterate for a plan between weights a (n,) and b (m,) at temperature eps and expose
the same interface to the solver (`transport.solver`): `set_eps`, `iterate`, `potentials` and
`plan` (the `PlanBlock` of the current iterate, for `transport.certificate.certify_plan`).

`KernelSinkhorn` (scaling form; Schmitzer 2019's absorption). Float64 potentials f (n,), g (m,)
are absorbed into the float32 kernel

    K_ij = exp((f_i + g_j - C_ij) / eps),     f_i = min_j (C_ij - g_j)   (so max_j K_ij = 1),

and the iterations move float32 scalings u (n,), v (m,): the plan is P_ij = a_i u_i K_ij v_j b_j,
its potentials f + eps log u and g + eps log v. One update, in one pass over K by blocks of rows,

    u_i <- 1 / sum_j K_ij b_j v_j,        v_j <- 1 / sum_i K_ij a_i u_i,

is the log-domain update of `transport.sinkhorn` in exponential form: two matrix-vector products
instead of a max-shifted log-sum-exp (several sweeps and an exp per entry). Before the u-update
the columns of P are exact and its rows sum to a_i u_i (K b v)_i, which gives the L1 marginal
error. g absorbs eps log v again when eps changes or a scaling leaves [exp(-ABSORB), exp(ABSORB)].
Entries below exp(KERNEL_FLOOR) are raised to it: float32 exp is slow on subnormal results, and the
raised entries change a row's sum by less than m exp(KERNEL_FLOOR) relative to its largest entry.
The certificate sums whatever K holds, so this changes neither bound's validity.

`LogSinkhorn`: the log-domain passes of `transport.sinkhorn.sinkhorn_pass` on float32 blocks of C
recomputed each pass (no n x m memory), potentials kept in float64.

Over-relaxation (`transport.sinkhorn.OverRelaxation`) applies to both: log u <- log u + omega
(log u_new - log u), i.e. u <- u_new (u / u_new)^(1 - omega).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from transport.certificate import PlanBlock, potential_plan
from transport.matrix import CostMatrix
from transport.sinkhorn import OverRelaxation, sinkhorn_pass

KERNEL_FLOOR = -60.0  # log of the smallest kernel entry (module docstring)
ABSORB = 30.0  # scalings are absorbed into the potentials beyond exp(+-ABSORB)
STALL_UPDATES = 50  # updates without progress after which an iteration stops (see `_Stall`)
KERNEL_BLOCK_ENTRIES = {"cpu": 2**20, "cuda": 2**40}  # CPU: blocks of 4 MiB stay in cache for both products


class KernelSinkhorn:
    """Scaling-form Sinkhorn on a float32 kernel (module docstring). `source` gives the blocks of C
    the kernel is rebuilt from (float64 or float32, held or recomputed); f, g start the potentials."""

    def __init__(self, source: CostMatrix, a: Tensor, b: Tensor, f: Tensor, g: Tensor) -> None:
        self.C, self.a, self.b = source, a, b
        self.n, self.m = source.n, source.m
        device = a.device
        self.a32, self.b32 = a.float(), b.float()
        self.K = torch.empty(self.n, self.m, dtype=torch.float32, device=device)
        self.f, self.g = f.clone(), g.clone()
        self.u = torch.ones(self.n, dtype=torch.float32, device=device)
        self.v = torch.ones(self.m, dtype=torch.float32, device=device)
        self.eps = math.nan
        self.float64 = False  # the iterations' arithmetic
        self.block_rows = max(1, min(self.n, KERNEL_BLOCK_ENTRIES[device.type if device.type == "cuda" else "cpu"] // self.m))
        self.rebuilds = 0

    def set_eps(self, eps: float) -> None:
        """Absorb the scalings and rebuild K at temperature eps (one pass over C with an exp). At
        the same eps the plan is kept (u carries f's offset from the c-transform, which the
        over-relaxation needs); at a new eps, f is the c-transform and the next update sets u."""
        same = eps == self.eps
        f_full = self.f + self.eps * self.u.double().log() if same else None
        if math.isfinite(self.eps):
            self.g += self.eps * self.v.double().log()
        self.eps, inv = eps, 1.0 / eps
        g_scaled = (self.g * inv).float()
        for rows, c in self.C.blocks():
            k = self.K[rows]
            k.copy_(c)
            torch.sub(g_scaled[None, :], k, alpha=inv, out=k)  # (g_j - C_ij) / eps
            peak = k.amax(1)
            k.sub_(peak[:, None]).clamp_min_(KERNEL_FLOOR).exp_()
            self.f[rows] = -eps * peak.double()
        self.u.fill_(1.0) if f_full is None else torch.exp(((f_full - self.f) * inv).clamp_(-ABSORB, ABSORB), out=self.u)
        self.v.fill_(1.0)
        self.rebuilds += 1

    def potentials(self) -> tuple[Tensor, Tensor]:
        """(f + eps log u, g + eps log v), float64."""
        return self.f + self.eps * self.u.double().log(), self.g + self.eps * self.v.double().log()

    def plan(self) -> PlanBlock:
        au, bv = self.a * self.u.double(), self.b * self.v.double()
        K = self.K

        def block(rows: slice, c: Tensor, out: Tensor, row: Tensor, col: Tensor) -> Tensor:
            return torch.mul(K[rows], (au[rows] * row)[:, None], out=out).mul_((bv * col)[None, :])

        return block

    def _update(self, omega: float) -> tuple[Tensor, Tensor, Tensor]:
        """One relaxed update: (u, v, [row marginal error, max |log u|, max |log v|])."""
        bv = self.b32 * self.v
        u_new = torch.empty_like(self.u)
        col = torch.zeros_like(self.v)
        err = torch.zeros((), dtype=torch.float32, device=self.u.device)
        for start in range(0, self.n, self.block_rows):
            rows = slice(start, min(start + self.block_rows, self.n))
            k = self.K[rows]
            s = (k @ bv).clamp_min_(1e-30)
            us = self.u[rows] * s  # the row sums of P over a_i, before the update
            err += torch.dot(self.a32[rows], (us - 1.0).abs())
            un = s.reciprocal_() if omega == 1.0 else s.reciprocal_().mul_(us.pow_(1.0 - omega))
            u_new[rows] = un
            col.addmv_(k.T, self.a32[rows] * un)
        col.clamp_min_(1e-30)
        v_new = col.reciprocal() if omega == 1.0 else col.reciprocal().mul_((self.v * col).pow_(1.0 - omega))
        extremes = torch.stack([err, u_new.log().abs().max(), v_new.log().abs().max()])
        return u_new, v_new, extremes

    def iterate(
        self, marg_tol: float, max_iter: int, deadline: float = math.inf, omega: float = 1.0, overrelax: bool = True
    ) -> tuple[int, float, float]:
        """Updates until the L1 marginal error is <= marg_tol, `max_iter` updates or `deadline`.
        Returns (updates, last marginal error, the over-relaxation omega reached)."""
        relax = OverRelaxation((self.u, self.v), omega, overrelax)
        it, err, stall = 0, math.inf, _Stall()
        while it < max_iter and time.perf_counter() < deadline:
            u, v, extremes = self._update(relax.omega)
            err, log_u, log_v = extremes.tolist()
            it += 1
            (self.u, self.v), diverged = relax.step(err, (self.u, self.v), (u, v))
            if (err <= marg_tol and not diverged) or stall(err):
                break
            if not diverged and max(log_u, log_v) > ABSORB:  # keep the scalings in float32's range
                self.set_eps(self.eps)
                relax = OverRelaxation((self.u, self.v), relax.omega, overrelax)
        return it, err, relax.omega


class LogSinkhorn:
    """Log-domain Sinkhorn on blocks of a float32 C recomputed each pass (module docstring)."""

    def __init__(self, source: CostMatrix, a: Tensor, b: Tensor, f: Tensor, g: Tensor) -> None:
        self.C, self.a, self.b = source, a, b
        self.f, self.g = f.clone(), g.clone()
        self.eps = math.nan
        self.float64 = source.x.dtype == torch.float64
        self.rebuilds = 0

    def set_eps(self, eps: float) -> None:
        self.eps = eps

    def potentials(self) -> tuple[Tensor, Tensor]:
        return self.f, self.g

    def plan(self) -> PlanBlock:
        return potential_plan(self.f, self.g, self.eps, self.a, self.b)

    def iterate(
        self, marg_tol: float, max_iter: int, deadline: float = math.inf, omega: float = 1.0, overrelax: bool = True
    ) -> tuple[int, float, float]:
        relax = OverRelaxation((self.f, self.g), omega, overrelax)
        it, err, stall = 0, math.inf, _Stall()
        while it < max_iter and time.perf_counter() < deadline:
            f, g, err = sinkhorn_pass(self.C, self.f, self.g, self.eps, relax.omega, self.a, self.b)
            it += 1
            (self.f, self.g), diverged = relax.step(err, (self.f, self.g), (f, g))
            if (err <= marg_tol and not diverged) or stall(err):
                break
        return it, err, relax.omega


class _Stall:
    """Called with each update's marginal error: True once STALL_UPDATES updates in a row have not
    improved the best error by 1% (the iterations have reached their arithmetic's resolution)."""

    def __init__(self) -> None:
        self.best, self.since = math.inf, 0

    def __call__(self, err: float) -> bool:
        if err < 0.99 * self.best:
            self.best, self.since = err, 0
        else:
            self.since += 1
        return self.since >= STALL_UPDATES
