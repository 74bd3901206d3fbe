"""The certified bracket on optimal transport between two sample sets (docs/theory.md section 5).

For samples x_1..x_n and y_1..y_m with uniform weights a, b and a cost from `transport.costs`,
W_c(a, b) = min over couplings pi of <pi, C>. `wasserstein_bracket` returns

    lower <= W_c(a, b) <= upper,

both certified whatever the solver's accuracy: `upper` is the cost of a feasible coupling (the
Sinkhorn plan rounded onto the exact marginals), `lower` the dual value of c-transformed
potentials (`transport.certificate`). The temperature is lowered (eps-scaling, warm-started) until
(upper - lower) / upper <= tol, so the upper end is then within tol / (1 - tol) of W_c. The entropic
value OT_eps (debias off) is also >= W_c; the debiased Sinkhorn divergence is not an upper bound
and is never reported here. E over samples of W_c(a, b) >= W_c(P_X, P_G) (joint convexity), so a
sample bound bounds the population value in expectation: n and m are reported beside it.

The exact value comes from POT's network simplex `ot.emd2` (`transport.exact`; optional:
`pip install POT`), which is also offered in place of the bracket where a measured cost model
predicts it to be faster (`exact="auto"`).

The solver (`transport.solver`) iterates in float32, on a kernel held in memory when the memory
budget allows it, and certifies in float64 from x and y; in low dimension it starts from a coarse
problem (`transport.multiscale`). Warm start by geomloss (`warm_start="geomloss"`): geomloss's
legacy tensorized `SamplesLoss` runs the first eps-scaling solve on the float64 cost matrix held
here; its schedule stops short of convergence, so iterations continue from its potentials. It is
not the default because each of its updates allocates full-size temporaries and costs several of
ours on CPU.

Everything runs on the samples' device (CPU or CUDA), outside autocast; POT runs on the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from maths.choices import check_choice
from transport.costs import check_cost_name, flatten_samples
from transport.entropic import blur_to_eps
from transport.exact import exact_wasserstein, pot_installed, prefer_exact
from transport.matrix import BACKENDS, memory_budget
from transport.solver import Problem, SolveResult, solve

WARM_STARTS: tuple[str, ...] = ("geomloss", "torch")

__all__ = ["Bracket", "WassersteinBracket", "exact_wasserstein", "pot_installed", "sinkhorn_upper_bound", "wasserstein_bracket"]


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
    the Sinkhorn updates in all (the coarse problem's included), `n` and `m` the sample sizes, `converged` whether
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
    method: str = "sinkhorn"  # "sinkhorn" (the certified bracket) or "exact" (POT's network simplex)


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
    *,
    memory_budget: int | None = None,
    multiscale: bool | None = None,
) -> WassersteinBracket:
    """Certified bracket lower <= W_c(x, y) <= upper between two sample sets (docs/theory.md 5.6).

    Args:
        x: (n, ...) samples, y: (m, ...) samples with the same number of features (flattened).
        cost: "l2sq" (||x - y||^2), "l2" (||x - y||) or "l1" (||x - y||_1).
        tol: stop once (upper - lower) / upper <= tol.
        max_seconds: time budget (None: none); when it runs out the bracket reached so far is
            returned with `converged=False` and its `relative_width`.
        backend: what is held in memory. "tensorized": the float64 cost matrix and the float32
            kernel (12 n m bytes); "chunked": neither (float32 log-domain passes over blocks of C
            recomputed each pass, certificates on float64 blocks; memory O((n + m) D)); "auto"
            (default): both if they fit in `memory_budget`, else the kernel alone, else neither.
        blur: None (default) lowers eps until the bracket is within tol; a blur radius fixes
            eps = 2 blur^2 (l2sq) or blur (l2, l1) and iterates there until the L1 marginal
            error is <= marg_tol, then certifies once.
        exact: True uses POT's `ot.emd2` instead (lower = upper = W_c; needs POT); "auto" does so
            when POT is installed, its 16 n m bytes fit in the memory budget and a measured cost
            model predicts it faster than the bracket (`transport.exact.prefer_exact`), and runs
            the certified Sinkhorn bracket otherwise.
        max_iter: Sinkhorn updates in all.
        marg_tol: with a fixed blur, the L1 marginal error at which iterations stop.
        chunk_size: rows per block of C recomputed by the chunked passes (default: 2^18 entries per
            block on CPU, 2^26 on CUDA).
        warm_start: how the first eps-scaling solve runs: "torch" (this package's iterations, with
            the multiscale start in low dimension) or "geomloss" (geomloss's solver; needs C held,
            slower per update on CPU).
        memory_budget: bytes the solve may hold (default: half the memory available on x's device,
            `transport.matrix.memory_budget`).
        multiscale: the coarse-to-fine start (`transport.multiscale`); None: in dimension <= 3 for
            clouds of 512 points or more.

    Returns: a frozen `WassersteinBracket`; `lower, upper = wasserstein_bracket(x, y)` works.
    """
    check_bracket_options(cost, backend, warm_start, tol, max_seconds, max_iter, marg_tol)
    start = time.perf_counter()
    x2, y2 = flatten_samples(x, y)
    n, m = x2.shape[0], y2.shape[0]
    budget = memory_budget if memory_budget is not None else _default_budget(x2)
    if exact == "auto":
        exact = prefer_exact(n, m, x2.shape[1], x2.device, budget)
    elif not isinstance(exact, bool):
        raise ValueError(f'exact must be True, False or "auto", got {exact!r}.')
    if exact:
        value = exact_wasserstein(x2, y2, cost)
        return WassersteinBracket(value, value, 0.0, 0, n, m, cost, True, time.perf_counter() - start, "exact")
    result = _solve_samples(x2, y2, cost, tol, max_seconds, backend, blur, max_iter, marg_tol, chunk_size, warm_start, start,
                            budget, multiscale)
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
    *,
    memory_budget: int | None = None,
    multiscale: bool | None = None,
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
    budget = memory_budget if memory_budget is not None else _default_budget(x2)
    result = _solve_samples(x2, y2, cost, tol, max_seconds, backend, blur, max_iter, marg_tol, chunk_size, warm_start, start,
                            budget, multiscale, entropic=not certified)
    return result.upper if certified else result.entropic


def _default_budget(x: Tensor) -> int:
    return memory_budget(x.device)


def _solve_samples(
    x2: Tensor, y2: Tensor, cost: str, tol: float, max_seconds: float | None, backend: str, blur: float | None,
    max_iter: int, marg_tol: float, chunk_size: int | None, warm_start: str, start: float, budget: int,
    multiscale: bool | None, entropic: bool = False,
) -> SolveResult:
    """`transport.solver.solve` on flattened float64 samples, with the options of `wasserstein_bracket`."""
    eps = blur_to_eps(blur, cost) if blur is not None else None
    deadline = start + max_seconds if max_seconds is not None else math.inf
    with torch.no_grad(), torch.autocast(x2.device.type, enabled=False):  # float32 means float32 here
        problem = Problem(x2, y2, cost, backend, chunk_size, budget)
        return solve(problem, tol=tol, eps=eps, marg_tol=marg_tol, max_iter=max_iter, deadline=deadline,
                     warm_start=warm_start, entropic=entropic, multiscale=multiscale)
