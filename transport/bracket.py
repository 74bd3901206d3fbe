"""The certified bracket on optimal transport between two sample sets (docs/theory.md section 5).

For samples x_1..x_n and y_1..y_m with uniform weights a, b and a cost from `transport.costs`,
W_c(a, b) = min over couplings pi of <pi, C>. `wasserstein_bracket` returns

    lower <= W_c(a, b) <= upper,

both certified whatever the solver's accuracy: `upper` is the cost of a feasible coupling (the
Sinkhorn plan rounded onto the exact marginals), `lower` the dual value of c-transformed
potentials (`transport.sinkhorn`). The temperature is lowered (eps-scaling, warm-started) until
(upper - lower) / upper <= tol, so the upper end is then within tol / (1 - tol) of W_c. The entropic
value OT_eps (debias off) is also >= W_c; the debiased Sinkhorn divergence is not an upper bound
and is never reported here. E over samples of W_c(a, b) >= W_c(P_X, P_G) (joint convexity), so a
sample bound bounds the population value in expectation: n and m are reported beside it.

The exact value comes from POT's network simplex `ot.emd2` (optional: `pip install POT`), which
is also offered in place of the bracket for small problems (`exact="auto"`).

Warm start by geomloss (`warm_start="geomloss"`): geomloss's legacy tensorized `SamplesLoss` runs the
first eps-scaling solve on the cost matrix held here; its schedule stops short of convergence,
so iterations continue from its potentials. It is not the default because each of its updates
allocates full-size temporaries and costs several of ours on CPU (docs/BENCHMARKS.md).

Everything runs on the samples' device (CPU or CUDA) in float64, outside autocast.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from maths.choices import check_choice
from transport.costs import check_cost_name, flatten_samples, pairwise_cost
from transport.entropic import blur_to_eps
from transport.matrix import BACKENDS, CostMatrix, cost_stats
from transport.sinkhorn import certify, geomloss_potentials, geomloss_schedule_length, sinkhorn

WARM_STARTS: tuple[str, ...] = ("geomloss", "torch")
EXACT_AUTO_ENTRIES = 2**22  # exact="auto": POT's exact solver up to this many cost-matrix entries


def _pot_installed() -> bool:
    return importlib.util.find_spec("ot") is not None


@dataclass(frozen=True)
class Bracket:
    """A certified bracket lower <= value <= upper. Unpacks as `lower, upper = bracket`."""

    lower: float
    upper: float

    @property
    def floor(self) -> float:
        """The least value the quantity can take (0 for transport costs)."""
        return 0.0

    @property
    def relative_width(self) -> float:
        """(upper - lower) / (upper - floor), 0 when upper is at the floor."""
        scale = self.upper - self.floor
        return (self.upper - self.lower) / scale if scale > 0 else 0.0

    def __iter__(self) -> Iterator[float]:
        yield self.lower
        yield self.upper


@dataclass(frozen=True)
class WassersteinBracket(Bracket):
    """A certified bracket lower <= W_c(a, b) <= upper between two sample sets (docs/theory.md 5.6).

    `eps` is the temperature of the last Sinkhorn stage (0 for the exact solver), `iterations`
    the Sinkhorn updates in all, `n` and `m` the sample sizes, `converged` whether
    relative_width <= tol was reached within the budget (or a width below 1e-12 of the largest
    cost, float64's resolution, when W_c ~ 0).
    """

    eps: float
    iterations: int
    n: int
    m: int
    cost: str
    converged: bool
    seconds: float = 0.0


def check_bracket_options(
    cost: str, backend: str, warm_start: str, tol: float, max_seconds: float | None, max_iter: int = 1, marg_tol: float = 1.0
) -> None:
    """Raise ValueError naming the bad option and its valid values."""
    check_cost_name(cost)
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive number of Sinkhorn updates, got {max_iter}.")
    if not marg_tol > 0:
        raise ValueError(f"marg_tol must be a positive L1 marginal error, got {marg_tol}.")
    check_choice("backend", backend, BACKENDS)
    check_choice("warm_start", warm_start, WARM_STARTS)
    if not 0 < tol < 1:
        raise ValueError(f"tol is a relative width in (0, 1), got {tol}.")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None (no limit), got {max_seconds}.")



def exact_wasserstein(x: Tensor, y: Tensor, cost: str = "l2sq") -> float:
    """Exact W_c between the empirical measures of x (n, ...) and y (m, ...) by POT's network
    simplex `ot.emd2` (uniform weights; cost as in the module docstring). Its time grows about
    cubically with n (docs/BENCHMARKS.md); memory n m float64. Needs POT (optional dependency)."""
    check_cost_name(cost)
    try:
        import ot
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "exact_wasserstein needs POT (Python Optimal Transport), an optional dependency: "
            'pip install POT, or pip install -e ".[test]" in this repository.'
        ) from err
    x2, y2 = flatten_samples(x, y)
    n, m = x2.shape[0], y2.shape[0]
    C = pairwise_cost(x2.cpu(), y2.cpu(), cost, out=torch.empty(n, m, dtype=torch.float64)).numpy()
    value, log = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), C, numItermax=max(100_000, 50 * n * m), log=True)
    if log.get("warning"):
        raise RuntimeError(f"POT's ot.emd2 did not reach the optimum: {log['warning']}")
    return float(value)


def wasserstein_bracket(
    x: Tensor,
    y: Tensor,
    cost: str = "l2sq",
    tol: float = 0.01,
    max_seconds: float | None = 60.0,
    backend: str = "auto",
    blur: float | None = None,
    exact: bool | str = False,
    max_iter: int = 10_000,
    marg_tol: float = 1e-4,
    chunk_size: int | None = None,
    warm_start: str = "torch",
) -> WassersteinBracket:
    """Certified bracket lower <= W_c(x, y) <= upper between two sample sets (docs/theory.md 5.6).

    Args:
        x: (n, ...) samples, y: (m, ...) samples with the same number of features (flattened).
        cost: "l2sq" (||x - y||^2), "l2" (||x - y||) or "l1" (||x - y||_1).
        tol: stop once (upper - lower) / upper <= tol.
        max_seconds: time budget (None: none); when it runs out the bracket reached so far is
            returned with `converged=False` and its `relative_width`.
        backend: "tensorized" (C in memory, 8 n m bytes plus one block of scratch), "chunked" (blocks
            of rows recomputed each pass: 2 MiB each on CPU, 32 MiB on CUDA), or "auto" (chunked
            above 2^25 entries).
        blur: None (default) lowers eps until the bracket is within tol; a blur radius fixes
            eps = 2 blur^2 (l2sq) or blur (l2, l1) and iterates there until the L1 marginal
            error is <= marg_tol, then certifies once.
        exact: True uses POT's `ot.emd2` instead (lower = upper = W_c; needs POT); "auto" does so
            when POT is installed and n m <= 2^22 (n = m = 2048; on tight clusters in low
            dimension the exact solver is then much faster than Sinkhorn), and runs the certified
            Sinkhorn bracket otherwise.
        max_iter: Sinkhorn updates in all.
        marg_tol: with a fixed blur, the L1 marginal error at which iterations stop.
        chunk_size: rows per block of the chunked backend (default: 2^18 entries per block on CPU,
            2^22 on CUDA).
        warm_start: how the first eps-scaling solve runs: "torch" (this module's iterations) or
            "geomloss" (geomloss's solver; tensorized backend only, slower per update on CPU, see
            the module docstring).

    Returns: a frozen `WassersteinBracket`; `lower, upper = wasserstein_bracket(x, y)` works.
    """
    check_bracket_options(cost, backend, warm_start, tol, max_seconds, max_iter, marg_tol)
    start = time.perf_counter()
    x2, y2 = flatten_samples(x, y)
    n, m = x2.shape[0], y2.shape[0]
    if exact == "auto":
        exact = x2.shape[0] * y2.shape[0] <= EXACT_AUTO_ENTRIES and _pot_installed()
    elif not isinstance(exact, bool):
        raise ValueError(f'exact must be True, False or "auto", got {exact!r}.')
    if exact:
        value = exact_wasserstein(x2, y2, cost)
        return WassersteinBracket(value, value, 0.0, 0, n, m, cost, True, time.perf_counter() - start)
    result = _solve_samples(x2, y2, cost, tol, max_seconds, backend, blur, max_iter, marg_tol, chunk_size, warm_start, start)
    return WassersteinBracket(
        result.lower, result.upper, result.eps, result.iterations, n, m, cost, result.converged, time.perf_counter() - start
    )


def sinkhorn_upper_bound(
    x: Tensor,
    y: Tensor,
    cost: str = "l2sq",
    blur: float | None = None,
    certified: bool = True,
    tol: float = 0.01,
    max_iter: int = 10_000,
    marg_tol: float = 1e-4,
    max_seconds: float | None = 60.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    warm_start: str = "torch",
) -> float:
    """An upper bound on W_c(x, y) from Sinkhorn (docs/theory.md 5.6), as a float.

    certified=True: the cost of the rounded coupling, >= W_c whatever the iterations (even one).
    certified=False: the entropic value OT_eps (debias off) of the rounded coupling,
    <pi, C> + eps KL(pi || a x b) >= OT_eps >= W_c, equal to OT_eps once the marginals are tight.

    blur=None (default): eps chosen from the data's scale, lowered until the certified bracket is
    within `tol` (the upper bound is then within tol / (1 - tol) of W_c); the entropic value is
    taken at the last eps. A blur radius fixes eps = 2 blur^2 (l2sq) or blur (l2, l1); iterations
    stop at an L1 marginal error of `marg_tol`, `max_iter` updates or `max_seconds`. Other
    arguments as in `wasserstein_bracket`.
    """
    check_bracket_options(cost, backend, warm_start, tol, max_seconds, max_iter, marg_tol)
    start = time.perf_counter()
    x2, y2 = flatten_samples(x, y)
    result = _solve_samples(x2, y2, cost, tol, max_seconds, backend, blur, max_iter, marg_tol, chunk_size, warm_start, start)
    return result.upper if certified else result.entropic


def _solve_samples(
    x2: Tensor, y2: Tensor, cost: str, tol: float, max_seconds: float | None, backend: str, blur: float | None,
    max_iter: int, marg_tol: float, chunk_size: int | None, warm_start: str, start: float,
) -> "SolveResult":
    """`solve` on flattened float64 samples, with the options of `wasserstein_bracket`."""
    eps = blur_to_eps(blur, cost) if blur is not None else None
    deadline = start + max_seconds if max_seconds is not None else math.inf
    C = CostMatrix(x2, y2, cost, backend, chunk_size)
    return solve(C, tol=tol, eps=eps, marg_tol=marg_tol, max_iter=max_iter, deadline=deadline, warm_start=warm_start)



@dataclass
class SolveResult:
    """Outcome of `solve`: the best certified bounds met on the way and how they were reached."""

    lower: float  # largest certified lower bound, <= W_c
    upper: float  # smallest certified upper bound (cost of a feasible coupling), >= W_c
    entropic: float  # entropic value of the last rounded coupling at `eps`, >= OT_eps >= W_c
    eps: float  # temperature of the last stage
    iterations: int  # Sinkhorn updates in all (geomloss's included)
    marginal_error: float  # L1 marginal error of the last plan before rounding
    converged: bool  # (upper - lower) <= tol * upper, or <= 1e-12 max C


FIRST_EPS = 1e-2  # the first stage's temperature, relative to the largest cost


def solve(
    C: CostMatrix,
    tol: float = 0.01,
    eps: float | None = None,
    marg_tol: float = 1e-4,
    max_iter: int = 10_000,
    deadline: float = math.inf,
    warm_start: str = "torch",
    scaling: float = 0.5,
) -> SolveResult:
    """Certified bracket on W_c(a, b) by Sinkhorn with eps-scaling (docs/theory.md 5.6).

    Start: eps-scaling from the largest cost down to the first temperature, by
    `sinkhorn(..., eps_start=cmax)` (`warm_start="torch"`), or by geomloss (`warm_start="geomloss"`,
    when C is held in memory and its schedule fits in `max_iter`; else the torch start).

    Fixed temperature (`eps` given): then iterations at eps until the L1 marginal error is
    <= marg_tol (or `max_iter` / `deadline`), then one certificate.

    Adaptive (`eps=None`, first temperature FIRST_EPS * max C): stages. Within a stage the plan is
    certified each time its marginal error has dropped 4x; the stage ends when a certificate's
    width shrank by less than 25% (the entropic bias, not the marginals, dominates), and the next
    stage lowers eps by 0.5 * tol * upper / width, clamped to [0.05, 0.5], warm-started by
    eps-scaling from the current potentials. Stops when the best bounds satisfy
    upper - lower <= tol * upper (or <= 1e-12 max C, the float64 resolution of the costs, for
    W_c ~ 0), or on `max_iter` / `deadline` (then `converged` is False).
    Every certificate is valid, so the best lower and upper over all of them are kept.
    """
    stats = cost_stats(C)
    lower, upper = stats.nearest, stats.mean

    def tight() -> bool:  # the target width, or the float64 resolution of the costs
        return upper - lower <= max(tol * upper, 1e-12 * stats.max)

    if stats.max <= 0.0 or (eps is None and tight()):  # all costs 0, or trivial bounds tight (n or m = 1, far-apart clouds)
        return SolveResult(lower, upper, upper, eps or 0.0, 0, 0.0, True)
    stage_eps = eps if eps is not None else FIRST_EPS * stats.max
    f = torch.zeros(C.n, dtype=torch.float64, device=C.x.device)
    g = torch.zeros(C.m, dtype=torch.float64, device=C.x.device)
    if warm_start == "geomloss" and C.full is not None and geomloss_schedule_length(stage_eps, stats.max, scaling) <= max_iter:
        f, g, it = geomloss_potentials(C, stage_eps, stats.max, scaling)
    else:
        f, g, it, _, _ = sinkhorn(
            C, f, g, stage_eps, eps_start=stats.max, scaling=scaling, marg_tol=math.inf, max_iter=max_iter, deadline=deadline
        )

    if eps is not None:  # fixed temperature: iterate until the marginals are tight, certify once
        f, g, k, _, _ = sinkhorn(C, f, g, eps, marg_tol=marg_tol, max_iter=max_iter - it, deadline=deadline)
        cert = certify(C, f, g, eps)
        lower, upper = max(lower, cert.lower), min(upper, cert.upper)
        it += k
        return SolveResult(lower, upper, cert.entropic, eps, it, cert.marginal_error, tight())

    while True:
        prev_width, target, omega = math.inf, 0.1, 1.0
        while True:  # one stage at stage_eps
            f, g, k, _, omega = sinkhorn(
                C, f, g, stage_eps, marg_tol=target, max_iter=max_iter - it, deadline=deadline, omega=omega
            )
            it += k
            cert = certify(C, f, g, stage_eps)
            lower, upper = max(lower, cert.lower), min(upper, cert.upper)
            converged = tight()
            if converged or it >= max_iter or time.perf_counter() >= deadline:
                return SolveResult(lower, upper, cert.entropic, stage_eps, it, cert.marginal_error, converged)
            width = cert.upper - cert.lower
            if width > 0.75 * prev_width or cert.marginal_error < 1e-12:
                break
            prev_width, target = width, 0.25 * cert.marginal_error
        new_eps = stage_eps * min(0.5, max(0.05, 0.5 * tol * upper / (upper - lower)))
        f, g, k, _, _ = sinkhorn(
            C, f, g, new_eps, eps_start=stage_eps * scaling, scaling=scaling, marg_tol=math.inf, max_iter=max_iter - it,
            deadline=deadline,
        )
        it, stage_eps = it + k, new_eps
