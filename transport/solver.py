"""The certified bracket's solver: eps schedule, warm starts and certificates (docs/theory.md 5.6).

`Problem` holds what the solve keeps in memory (`transport.matrix.choose_layout`): the float64
cost matrix C (certificates) and the float32 kernel (`transport.kernel.KernelSinkhorn`), or
neither (`LogSinkhorn` on float32 blocks of C recomputed each pass, certificates on float64 blocks
recomputed from x and y). `solve` runs the schedule:

- Start: eps-scaling from the largest cost down to the first temperature FIRST_EPS max C, one
  update per stage, eps *= SCALING (`warm_start="torch"`); or geomloss's eps-scaling solve on the
  float64 matrix (`warm_start="geomloss"`); or, in low dimension, the multiscale start
  (`transport.multiscale`): the clustered problem is solved by this same function (recursively,
  to the same tol), its potential lifted to the fine points at its final eps (at least the
  clustering's scale q), its value W' estimating W_c.
- Fixed temperature (`eps` given): iterate at eps until the L1 marginal error is <= marg_tol,
  then certify once.
- Adaptive (`eps=None`): stages. Rounding moves about half the L1 marginal error e of mass at a
  cost of the order of the mean cost, so a stage first certifies at e = tol W / (2 mean C) (W the
  best lower end, or W'), then each time e has dropped 4x. The stage ends when the width shrank by
  less than 25%, or stays above 2 tol at that e (the entropic bias dominates); the next lowers eps
  by (tol upper / (2 width))^(1/alpha), clamped to [0.05, 0.5], warm-started from the current
  potentials. The bias shrinks like eps^alpha, alpha = 1 + (nearest-neighbour bound / mean cost)
  at first (1 where the clouds fill their space, 2 where the plan is nearly a permutation), then
  measured between stages. Stops when the best bounds satisfy upper - lower <= tol upper (or
  <= 1e-12 max C, the float64 resolution of the costs, for W_c ~ 0), or on `max_iter` /
  `deadline` (then `converged` is False). Every certificate is valid, so the best ends over all
  of them are kept.

Iterations run in float32 (float64 log-domain passes take over where float32 stalls above the
requested marginal error); every certificate is computed in float64 from C
(`transport.certificate.certify_plan`), so float32 only decides how fast the bounds close.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from transport.certificate import certify_plan
from transport.kernel import KernelSinkhorn, LogSinkhorn
from transport.matrix import SOLVER_BLOCK_ENTRIES, CostMatrix, CostStats, Layout, choose_layout, cost_stats, memory_budget
from transport.multiscale import coarsen, lift, use_multiscale
from transport.sinkhorn import geomloss_potentials, geomloss_schedule_length

FIRST_EPS = 1e-2  # the first stage's temperature, relative to the largest cost
SCALING = 0.1  # eps-scaling factor between warm-start stages (one update each)
COARSE_MARG_TOL = 1e-3  # marginal error of a coarse problem solved at a fixed eps


class Problem:
    """Weights a, b (default uniform) on x (n, D), y (m, D) float64, the cost, and what is held
    (module docstring). `budget` bytes (default `transport.matrix.memory_budget`) decide the
    "auto" layout."""

    def __init__(
        self, x: Tensor, y: Tensor, cost: str, backend: str = "auto", chunk_size: int | None = None,
        budget: int | None = None, weights: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.x, self.y, self.cost, self.backend, self.budget = x, y, cost, backend, budget
        self.n, self.m = x.shape[0], y.shape[0]
        budget = memory_budget(x.device) if budget is None else budget
        self.layout: Layout = choose_layout(self.n, self.m, backend, budget)
        held = "tensorized" if self.layout.cost64 else "chunked"
        self.chunk_size, self.entries = chunk_size, SOLVER_BLOCK_ENTRIES["cuda" if x.device.type == "cuda" else "cpu"]
        self.C = CostMatrix(x, y, cost, held, chunk_size, self.entries)  # float64: statistics and certificates
        if weights is None:
            weights = (torch.full((self.n,), 1.0 / self.n, dtype=x.dtype, device=x.device),
                       torch.full((self.m,), 1.0 / self.m, dtype=x.dtype, device=x.device))
        self.a, self.b = weights

    def engine(self, f: Tensor, g: Tensor, float64: bool = False) -> KernelSinkhorn | LogSinkhorn:
        """The iterations, started from potentials (f, g): on the kernel when it is held;
        `float64`: log-domain passes over the float64 C (for marginal errors float32 cannot reach)."""
        if float64:
            return LogSinkhorn(self.C, self.a, self.b, f, g)
        source = self.C
        if not self.layout.cost64:  # float32 blocks recomputed for the kernel's rebuilds or the passes
            source = CostMatrix(self.x.float(), self.y.float(), self.cost, "chunked", self.chunk_size, self.entries)
        if self.layout.kernel:
            return KernelSinkhorn(source, self.a, self.b, f, g)
        return LogSinkhorn(source, self.a, self.b, f, g)


@dataclass
class SolveResult:
    """Outcome of `solve`: the best certified bounds met on the way and how they were reached."""

    lower: float  # largest certified lower bound, <= W_c
    upper: float  # smallest certified upper bound (cost of a feasible coupling), >= W_c
    entropic: float  # entropic value of the last rounded coupling at `eps`, >= OT_eps >= W_c
    eps: float  # temperature of the last stage
    iterations: int  # Sinkhorn updates in all (geomloss's and the coarse problems' included)
    marginal_error: float  # L1 marginal error of the last plan before rounding
    converged: bool  # (upper - lower) <= tol * upper, or <= 1e-12 max C
    certificates: int = 0  # float64 certificates computed
    rebuilds: int = 0  # kernel rebuilds (exp passes over C)


class _Bounds:
    """The best certified ends so far and the stopping rule."""

    def __init__(self, stats: CostStats, tol: float) -> None:
        self.lower, self.upper, self.tol, self.resolution = stats.nearest, stats.mean, tol, 1e-12 * stats.max
        self.count = 0

    def add(self, lower: float, upper: float) -> None:
        self.lower, self.upper = max(self.lower, lower), min(self.upper, upper)
        self.count += 1

    def tight(self) -> bool:
        return self.upper - self.lower <= max(self.tol * self.upper, self.resolution)


def solve(
    problem: Problem,
    tol: float = 0.01,
    eps: float | None = None,
    marg_tol: float = 1e-4,
    max_iter: int = 10_000,
    deadline: float = math.inf,
    warm_start: str = "torch",
    entropic: bool = False,
    multiscale: bool | None = None,
) -> SolveResult:
    """Certified bracket on W_c(a, b) (module docstring). `entropic` also computes the entropic
    value of every certificate; `multiscale` None uses the coarse-to-fine start where it helps
    (`transport.multiscale.use_multiscale`)."""
    return _solve(problem, tol, eps, marg_tol, max_iter, deadline, warm_start, entropic, multiscale)[0]


def _start(problem: Problem, stats: CostStats, tol: float, eps: float | None, max_iter: int, deadline: float,
           warm_start: str, multiscale: bool) -> tuple[KernelSinkhorn | LogSinkhorn, float, int, float]:
    """The engine at its first temperature: (engine, first eps, updates made, an estimate of W_c
    or 0)."""
    first = eps if eps is not None else FIRST_EPS * stats.max
    device = problem.x.device
    zeros_f, zeros_g = (torch.zeros(k, dtype=torch.float64, device=device) for k in (problem.n, problem.m))
    if warm_start == "geomloss" and problem.C.full is not None and geomloss_schedule_length(first, stats.max, SCALING) <= max_iter:
        f, g, it = geomloss_potentials(problem.C, first, stats.max, SCALING)
        engine = problem.engine(f, g)
        engine.set_eps(first)
        return engine, first, it, 0.0
    if not multiscale:
        engine = problem.engine(zeros_f, zeros_g)
        return engine, first, _scale_down(engine, stats.max, first, max_iter, deadline), 0.0
    # Coarse to fine: solve the clustered problem (recursively), lift its potentials, start there.
    cx, ax, cy, by, q = coarsen(problem.x, problem.y, problem.cost)
    coarse = Problem(cx, cy, problem.cost, problem.backend, budget=problem.budget, weights=(ax, by))
    fixed = max(eps, q) if eps is not None else None
    result, coarse_engine = _solve(coarse, tol, fixed, COARSE_MARG_TOL, max_iter, deadline, "torch", False, None)
    start = max(result.eps, q) if eps is None else fixed
    start = start if start > 0 else FIRST_EPS * stats.max  # clusters of one point each, coarse problem trivial
    f_coarse, _ = coarse_engine.potentials()
    engine = problem.engine(zeros_f, lift(cx, ax, f_coarse, problem.y, problem.cost, start))
    first = eps if eps is not None else start
    it = result.iterations + _scale_down(engine, start, first, max_iter - result.iterations, deadline)
    return engine, first, it, result.lower


def _solve(
    problem: Problem, tol: float, eps: float | None, marg_tol: float, max_iter: int, deadline: float, warm_start: str,
    entropic: bool, multiscale: bool | None,
) -> tuple[SolveResult, KernelSinkhorn | LogSinkhorn | None]:
    """`solve`, also returning the engine (its potentials lift a coarse solve to the fine problem)."""
    stats = cost_stats(problem.C, problem.a, problem.b)
    bounds = _Bounds(stats, tol)
    if stats.max <= 0.0 or (eps is None and bounds.tight()):  # all costs 0, or the trivial bounds are tight
        zeros = torch.zeros(problem.n, dtype=torch.float64, device=problem.x.device)
        engine = problem.engine(zeros, torch.zeros(problem.m, dtype=torch.float64, device=problem.x.device), float64=True)
        engine.set_eps(eps or max(stats.max, 1e-300))
        return SolveResult(bounds.lower, bounds.upper, bounds.upper, eps or 0.0, 0, 0.0, True), engine
    if multiscale is None:
        multiscale = warm_start == "torch" and use_multiscale(problem.n, problem.m, problem.x.shape[1])
    engine, first, it, estimate = _start(problem, stats, tol, eps, max_iter, deadline, warm_start, multiscale)

    def iterate(target: float, omega: float = 1.0) -> tuple[float, float]:
        """Updates towards marginal error `target`; float64 passes take over where float32 stalls."""
        nonlocal engine, it
        k, err, omega = engine.iterate(target, max_iter - it, deadline, omega)
        it += k
        if err > target and it < max_iter and time.perf_counter() < deadline and not engine.float64:
            precise = problem.engine(*engine.potentials(), float64=True)
            precise.set_eps(engine.eps)
            k, err, omega = precise.iterate(target, max_iter - it, deadline, omega)
            it, engine = it + k, precise
        return err, omega

    def certificate(stage_eps: float):
        cert = certify_plan(problem.C, engine.plan(), problem.a, problem.b, *engine.potentials(), stage_eps, entropic)
        bounds.add(cert.lower, cert.upper)
        return cert

    def result(cert, stage_eps: float, converged: bool) -> tuple[SolveResult, KernelSinkhorn | LogSinkhorn]:
        return SolveResult(bounds.lower, bounds.upper, cert.entropic, stage_eps, it, cert.marginal_error, converged,
                           bounds.count, engine.rebuilds), engine

    if eps is not None:  # fixed temperature: iterate until the marginals are tight, certify once
        iterate(marg_tol)
        return result(certificate(eps), eps, bounds.tight())

    def rounding_target() -> float:
        # Rounding moves about half the L1 marginal error of mass at a cost of the order of the mean
        # cost: below this error, the rounding's share of the width is about tol / 2 at most.
        w = max(bounds.lower, estimate if bounds.count == 0 else 0.0)  # the coarse problem's W_c until certified
        if w < 0.05 * stats.mean and bounds.count == 0:  # no estimate of W_c yet
            return 1e-2
        return min(1e-2, max(1e-7, 0.5 * tol * w / stats.mean))

    # The width's entropic part shrinks like eps^alpha: alpha ~ 1 where the clouds fill their space
    # (nearest-neighbour costs << W_c), faster where the plan is nearly a permutation (nearest ~ W_c).
    alpha, last = 1.0 + min(1.0, max(0.0, stats.nearest / stats.mean)), None
    stage_eps, omega = first, 1.0
    while True:
        prev_width, target = math.inf, rounding_target()
        while True:  # one stage at stage_eps
            _, omega = iterate(target, omega)
            cert = certificate(stage_eps)
            converged = bounds.tight()
            if converged or it >= max_iter or time.perf_counter() >= deadline:
                return result(cert, stage_eps, converged)
            width, goal = cert.upper - cert.lower, rounding_target()
            if width > 0.75 * prev_width or cert.marginal_error < 1e-9:
                break  # the width no longer follows the marginals: the entropic bias dominates
            if cert.marginal_error <= 1.5 * goal and width > 2.0 * tol * cert.upper:
                break  # marginals tight enough, width far above tol: the same
            prev_width, target = width, min(0.25 * cert.marginal_error, goal)
        width = bounds.upper - bounds.lower
        if last is not None and last[1] > width > 0:  # measured between the last two stages
            alpha = min(3.0, max(1.0, math.log(last[1] / width) / math.log(last[0] / stage_eps)))
        last = (stage_eps, width)
        new_eps = stage_eps * min(0.5, max(0.05, (0.5 * tol * bounds.upper / width) ** (1.0 / alpha)))
        it += _scale_down(engine, stage_eps * SCALING, new_eps, max_iter - it, deadline)
        stage_eps, omega = new_eps, 1.0


def _scale_down(engine: KernelSinkhorn | LogSinkhorn, start: float, eps: float, max_iter: int, deadline: float) -> int:
    """eps-scaling: one update at each temperature start, start * SCALING, ... above eps, then the
    engine is left at eps (its kernel built). Returns the updates made."""
    it, stage = 0, start
    while stage > eps and it < max_iter and time.perf_counter() < deadline:
        engine.set_eps(stage)
        k, _, _ = engine.iterate(0.0, 1, deadline, overrelax=False)
        it, stage = it + k, stage * SCALING
    if engine.eps != eps:
        engine.set_eps(eps)
    return it
