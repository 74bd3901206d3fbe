"""The exact dual side on samples: a certified bracket on the inf-convolution (docs/theory.md section 7)

    V = GAN_{lambda f}(P^, Q^; H_c) = min over P' of  W_c(P^, P') + lambda D_f(P' || Q^),

for empirical measures P^ (x_i, weights a_i = 1/n) and Q^ (y_j, weights b_j = 1/m) and a metric c
(Husain, Nock, Williamson 2019, first identity of the main theorem). Write P' = sum_j q_j delta_{y_j} + s
with s the part of P' off the samples of Q^: it costs lambda f'(inf) per unit wherever it sits, so it
sits on the x_i (no transport). V is then the convex problem

    min over pi >= 0 (n, m), s >= 0 (n) with pi 1 + s = a:
        <pi, C> + lambda sum_j b_j f(q_j / b_j) + lambda f'(inf) sum_i s_i,     q = pi^T 1,

with s = 0 for rows with f'(inf) = inf (kl, pearson). Its Lagrangian dual, over potentials u with
u_i <= lambda f'(inf), is

    D(u) = sum_i a_i u_i - sum_j b_j (lambda f)*(h_j),     h_j = max_i (u_i - C_ij),

the f-GAN objective of the critic h (its value u on the x_i and its c-transform on the y_j; for a metric
c, z -> max_i (u_i - c(x_i, z)) is a 1-Lipschitz extension), with the conjugate over u >= 0.

Solver: entropic semi-relaxed Sinkhorn in the log domain, with plan pi_ij = a_i b_j exp((u_i - h_j - C_ij)
/ eps) and, for finite f'(inf), an off-sample column s_i = a_i exp((u_i - lambda f'(inf)) / eps):
- u-update (first marginal exact): u_i = -eps log(sum_j b_j exp(-(h_j + C_ij) / eps) + exp(-lambda f'(inf) / eps));
- h-update (the proximal step of lambda D_f at the column sums A_j = sum_i a_i exp((u_i - C_ij) / eps)):
  h_j = lambda t_j with A_j exp(-kappa t_j) in the subdifferential of f* at t_j, kappa = lambda / eps;
  for kl, t_j = (1 + log A_j) / (1 + kappa), the usual exponent lambda / (lambda + eps).
eps is lowered (eps-scaling, warm-started) until the certified width meets `tol`. Certificates:
- upper: the objective at the plan with rows rescaled to a exactly (a feasible pair (pi, s)), in float64;
- lower: D at the feasible potential u* = min(lambda f'(inf), min_j (C_ij + h_j)) with h the c-transform
  of the clipped u, and the best constant shift of both: every such value is <= V, and V <= W_c(P^, Q^) +
  lambda f(1), so the lower end is also a certified lower bound on W_c.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from maths.choices import check_choice
from maths.divergences import FDivergence, get_divergence
from transport.bracket import Bracket
from transport.costs import METRIC_COSTS, flatten_samples
from transport.matrix import BACKENDS, CostMatrix, cost_stats
from transport.sinkhorn import EXP_FLOOR, OverRelaxation, _logsumexp_

LOG2 = math.log(2.0)
BISECTION_STEPS = 64  # halvings of brackets of width up to ~1e3: below float64 resolution


@dataclass(frozen=True)
class _ConjugateRow:
    """The conjugate f* over u >= 0 of one registry row (unscaled), its derivative, and the root of
    the column update A exp(-kappa t) in df*(t) (log A given)."""

    conjugate: Callable[[Tensor], Tensor]  # f*(t), +inf above dom f*
    derivative: Callable[[Tensor], Tensor]  # (f*)'(t), a subgradient where f* has a kink
    column_root: Callable[[Tensor, float], Tensor]  # (log A, kappa) -> t


def _bisect(increasing: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor) -> Tensor:
    """Elementwise root of an increasing function with increasing(lo) <= 0 <= increasing(hi)."""
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = increasing(mid) > 0
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


def _pearson_root(log_a: Tensor, kappa: float) -> Tensor:
    # t / 2 + 1 = A exp(-kappa t) with t > -2; in r = log(t / 2 + 1): r + 2 kappa (e^r - 1) = log A,
    # increasing in r, <= 0 at min(log A, 0) and >= 0 at log(1 + max(log A, 0) / (2 kappa)).
    lo, hi = torch.clamp(log_a, max=0.0), torch.log1p(torch.clamp(log_a, min=0.0) / (2.0 * kappa))
    r = _bisect(lambda r: r + 2.0 * kappa * torch.expm1(r) - log_a, torch.minimum(lo, hi), hi)
    return 2.0 * torch.expm1(r)


def _log_ratio_root(top: float) -> Callable[[Tensor, float], Tensor]:
    """Column root for rows whose (f*)' = e^t / (c - e^t) below t = log c = `top` (jensen_shannon: c = 2,
    gan: c = 1). F(t) = log (f*)'(t) + kappa t - log A increases from -inf to +inf on (-inf, top); the
    root can sit far closer to `top` than its scale, so it is bisected in z = log(top - t), where
    log (f*)'(t) = t - top - log(1 - exp(-(top - t))) keeps full precision."""
    closest = math.log(max(abs(top) * 2.0**-52, 1e-300))  # the nearest float below top, as z

    def root(log_a: Tensor, kappa: float) -> Tensor:
        def decreasing(z: Tensor) -> Tensor:  # F at t = top - e^z
            gap = torch.exp(z)
            t = top - gap
            return t - top - torch.log(-torch.expm1(-gap)) + kappa * t - log_a

        # below t = min((log A - log 2) / (1 + kappa), top - log 2), F <= 0 (its asymptote)
        far = torch.log(top - torch.clamp((log_a - LOG2) / (1.0 + kappa), max=top - LOG2))
        z = _bisect(lambda z: -decreasing(z), torch.full_like(log_a, closest), far)
        return top - torch.exp(z)

    return root


def _log1mexp(x: Tensor) -> Tensor:
    return torch.where(x > -LOG2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


_ROWS: dict[str, _ConjugateRow] = {
    "kl": _ConjugateRow(
        conjugate=lambda t: torch.exp(t - 1.0),
        derivative=lambda t: torch.exp(t - 1.0),
        column_root=lambda log_a, kappa: (1.0 + log_a) / (1.0 + kappa),
    ),
    "pearson": _ConjugateRow(  # f(u) = (u - 1)^2 on u >= 0: f*(t) = t^2 / 4 + t above t = -2, -1 below
        conjugate=lambda t: torch.where(t >= -2.0, 0.25 * t * t + t, torch.full_like(t, -1.0)),
        derivative=lambda t: torch.clamp(0.5 * t + 1.0, min=0.0),
        column_root=_pearson_root,
    ),
    "jensen_shannon": _ConjugateRow(  # f*(t) = -log(2 - e^t) for t < log 2
        conjugate=lambda t: torch.where(t < LOG2, -LOG2 - _log1mexp(torch.clamp(t, max=LOG2) - LOG2), torch.full_like(t, math.inf)),
        derivative=lambda t: torch.exp(t - LOG2 - _log1mexp(t - LOG2)),
        column_root=_log_ratio_root(LOG2),
    ),
    "gan": _ConjugateRow(  # f*(t) = -log(1 - e^t) for t < 0
        conjugate=lambda t: torch.where(t < 0.0, -_log1mexp(torch.clamp(t, max=-1e-300)), torch.full_like(t, math.inf)),
        derivative=lambda t: torch.exp(t - _log1mexp(t)),
        column_root=_log_ratio_root(0.0),
    ),
    "total_variation": _ConjugateRow(  # f(u) = |u - 1| / 2 on u >= 0: f*(t) = max(t, -1/2) for t <= 1/2
        conjugate=lambda t: torch.where(t <= 0.5, torch.clamp(t, min=-0.5), torch.full_like(t, math.inf)),
        derivative=lambda t: (t > -0.5).to(t.dtype),
        column_root=lambda log_a, kappa: torch.clamp(log_a / kappa, -0.5, 0.5),
    ),
}
SUPPORTED_DIVERGENCES: tuple[str, ...] = tuple(_ROWS)  # the rows whose activation g_f is 1-Lipschitz


def check_inf_convolution_divergence(divergence: str) -> None:
    """ValueError naming the supported rows unless `divergence` is one of them."""
    if divergence not in SUPPORTED_DIVERGENCES:
        known = get_divergence(divergence).name  # an unknown name gets the registry's own message first
        raise ValueError(
            f"inf_convolution_bracket supports the rows whose activation g_f is 1-Lipschitz, "
            f"{', '.join(SUPPORTED_DIVERGENCES)}; got {known!r}: its critics are not in H_c, so the identity "
            "with the f-GAN dual over H_c does not apply."
        )


@dataclass(frozen=True)
class InfConvolutionBracket(Bracket):
    """A certified bracket lower <= V <= upper on V = min_P' W_c(P^, P') + lambda D_f(P' || Q^).

    `lower` is also a certified lower bound on W_c(P^, Q^) + lambda f(1) (f(1) = 0 but for gan).
    At the upper end's feasible point: `transport` = W part (<pi, C>), `penalty` = lambda D_f(P' || Q^),
    `off_support` = the mass of P' off the samples of Q^ (0 for kl and pearson). `eps` is the last
    temperature, `iterations` the Sinkhorn passes, `converged` whether the width met `tol`.
    """

    transport: float
    penalty: float
    off_support: float
    eps: float
    iterations: int
    n: int
    m: int
    cost: str
    divergence: str
    lambda_: float
    converged: bool
    seconds: float = 0.0

    @property
    def floor(self) -> float:
        """lambda f(1) <= V: both terms are bounded below (W_c >= 0, D_f >= f(1))."""
        return float(get_divergence(self.divergence, self.lambda_).f(torch.tensor(1.0, dtype=torch.float64)))


class _Problem:
    """The cost matrix, the row (lambda f) and its conjugate, and the passes over C."""

    def __init__(self, C: CostMatrix, divergence: FDivergence) -> None:
        self.C, self.div, self.row = C, divergence, _ROWS[divergence.name]
        self.lam = divergence.scale
        self.off_cost = divergence.f_prime_infinity  # lambda f'(inf): the price of mass off Q^'s samples
        self.floor = float(divergence.f(torch.tensor(1.0, dtype=torch.float64)))  # lambda f(1) <= V
        self.log_a, self.log_b = -math.log(C.n), -math.log(C.m)

    def conjugate(self, h: Tensor) -> Tensor:
        """(lambda f)*(h) = lambda f*(h / lambda), elementwise."""
        return self.lam * self.row.conjugate(h / self.lam)

    def column_update(self, log_col: Tensor, eps: float) -> Tensor:
        """h from log A_j: the proximal step of lambda D_f at temperature eps."""
        return self.lam * self.row.column_root(log_col, self.lam / eps)

    def sweep(self, u: Tensor, h: Tensor, eps: float, omega: float = 1.0) -> tuple[Tensor, Tensor, float]:
        """One pass: the u-update (rows exact; over-relaxed by omega), then log A_j for the next
        h-update. Returns (u, log A, L1 row-marginal error of the plan of the input (u, h))."""
        C, inv = self.C, 1.0 / eps
        u_new, err = torch.empty_like(u), torch.zeros((), dtype=u.dtype, device=u.device)
        log_col = torch.full_like(h, -math.inf)
        for rows, c in C.blocks():
            buf = C.scratch(rows)
            torch.add(h[None, :], c, out=buf).mul_(-inv)  # -(h_j + C_ij) / eps, (b, m)
            lse = _logsumexp_(buf, 1) + self.log_b
            if math.isfinite(self.off_cost):
                lse = torch.logaddexp(lse, torch.full_like(lse, -self.off_cost * inv))
            ui = -eps * lse  # (b,)
            err += torch.expm1((u[rows] - ui) * inv).abs().sum()
            if omega != 1.0:  # over-relaxed, kept feasible: u <= lambda f'(inf)
                ui = torch.clamp(u[rows] + omega * (ui - u[rows]), max=self.off_cost)
            u_new[rows] = ui
            torch.sub((ui * inv)[:, None], c, alpha=inv, out=buf)  # (u_i - C_ij) / eps
            log_col = torch.logaddexp(log_col, _logsumexp_(buf, 0) + self.log_a)
        return u_new, log_col, err.item() / C.n

    def certify(
        self, u: Tensor, h: Tensor, eps: float
    ) -> tuple[float, float, float, float, float, tuple[Tensor, Tensor]]:
        """(lower, upper, transport, penalty, off-support mass, (u, h) of the lower end) from the
        potentials: two passes over C."""
        C, inv, n, m = self.C, 1.0 / eps, self.C.n, self.C.m
        u_clip = torch.clamp(u, max=self.off_cost)
        h_ct = torch.full_like(h, -math.inf)  # c-transform of u_clip: max_i (u_i - C_ij)
        q, transport, off = torch.zeros_like(h), 0.0, 0.0
        for rows, c in C.blocks():  # pass 1: c-transform, and the plan with its rows rescaled to a
            buf = C.scratch(rows)
            h_ct = torch.maximum(h_ct, torch.sub(u_clip[rows, None], c, out=buf).amax(0))
            torch.add(h[None, :], c, out=buf).mul_(-inv).add_((u[rows] * inv)[:, None] + self.log_b)
            log_off = (u[rows] - self.off_cost) * inv if math.isfinite(self.off_cost) else None
            peak = buf.amax(1, keepdim=True)
            if log_off is not None:
                peak = torch.maximum(peak, log_off[:, None])
            buf.sub_(peak).clamp_min_(EXP_FLOOR).exp_()  # plan rows / exp(peak), (b, m)
            total = buf.sum(1)
            if log_off is not None:
                off_rows = torch.exp(log_off - peak[:, 0])
                total = total + off_rows
                off += (off_rows / total).sum().item() / n
            buf.div_(total[:, None] * n)  # each row now carries exactly a_i = 1/n
            q += buf.sum(0)
            transport += torch.dot(buf.reshape(-1), c.reshape(-1)).item()
        u_star = torch.full_like(u, self.off_cost)
        for rows, c in C.blocks():  # pass 2: the largest u compatible with h_ct, clipped
            u_star[rows] = torch.minimum(u_star[rows], torch.add(c, h_ct[None, :], out=C.scratch(rows)).amin(1))
        penalty = (self.div.f(q * m).sum() / m).item()
        upper = transport + penalty + (self.off_cost * off if off > 0 else 0.0)
        lower, shift = self._best_shift(u_star, h_ct)
        return lower, upper, transport, penalty, off, (u_star + shift, h_ct + shift)

    def _best_shift(self, u: Tensor, h: Tensor) -> tuple[float, float]:
        """(max over c of D(u + c, h + c) = mean u + c - mean (lambda f)*(h + c), u + c <= lambda f'(inf);
        the maximising c)."""
        mean_u = u.mean().item()
        if self.div.name == "kl":  # M = mean exp(h / lambda): c = lambda (1 - log M), D = mean u - lambda log M
            log_mean = torch.logsumexp(h / self.lam, 0).item() + self.log_b
            return mean_u - self.lam * log_mean, self.lam * (1.0 - log_mean)

        def slope(c: Tensor) -> Tensor:  # d/dc of the dual, decreasing in c
            return 1.0 - self.row.derivative((h[None, :] + c[:, None]) / self.lam).mean(1)

        spread = (h.max() - h.min()).item() + 10.0 * self.lam
        c_hi = self.off_cost - u.max().item() if math.isfinite(self.off_cost) else -h.min().item() + spread
        c_hi_t = torch.tensor([c_hi], dtype=h.dtype, device=h.device)
        if slope(c_hi_t).item() >= 0:  # the dual still rises at the constraint: shift up to it
            c = c_hi_t
        else:
            c = _bisect(lambda t: -slope(t), torch.tensor([-h.max().item() - spread], dtype=h.dtype, device=h.device), c_hi_t)
        return mean_u + c.item() - self.conjugate(h + c).mean().item(), c.item()


FIRST_EPS = 0.1  # the first temperature, relative to the largest cost


def _solve(problem: _Problem, tol: float, max_iter: int, deadline: float
           ) -> tuple[tuple[float, ...], float, int, bool, tuple[Tensor, Tensor] | None]:
    """eps-scaling until (upper - lower) <= tol (upper - lambda f(1)): returns (the certificate with
    the smallest upper end and the largest lower end met), the last eps, the passes, converged, and the
    potentials (u on x, h on y) whose dual value is the lower end."""
    C = problem.C
    stats = cost_stats(C)
    cmax = max(stats.max, 1e-300)
    # The critic of P' = Q^: h = lambda f'(1), where (f*)' = 1 (docs/theory.md 2.5); near the optimum for
    # large lambda, where a start at 0 would drift there by steps of about eps.
    start = min(problem.div.f_prime_one, problem.off_cost)
    u = torch.full((C.n,), start, dtype=torch.float64, device=C.x.device)
    h = torch.full((C.m,), start, dtype=torch.float64, device=C.x.device)
    eps, it = FIRST_EPS * cmax, 0
    best_lower, best = -math.inf, (math.inf, 0.0, 0.0, 0.0)  # (upper, transport, penalty, off)
    potentials = None  # (u, h) of best_lower

    def tight() -> bool:
        return best[0] - best_lower <= max(tol * (best[0] - problem.floor), 1e-12 * cmax)

    while True:
        prev_width, target, relax = math.inf, 0.1, OverRelaxation((u, h))
        while True:  # one stage at eps: passes until the row marginals are within target, then certify
            err = math.inf
            while err > target and it < max_iter and time.perf_counter() < deadline:
                u_next, log_col, err = problem.sweep(u, h, eps, relax.omega)
                h_next = problem.column_update(log_col, eps)
                if relax.omega != 1.0:  # h stays in dom (lambda f)*, below lambda f'(inf)
                    h_next = torch.clamp(h + relax.omega * (h_next - h), max=problem.off_cost)
                (u, h), diverged = relax.step(err, (u, h), (u_next, h_next))
                err = math.inf if diverged else err
                it += 1
            lower, *upper, lower_potentials = problem.certify(u, h, eps)
            if lower > best_lower:
                best_lower, potentials = lower, lower_potentials
            best = min(best, tuple(upper))
            if tight() or it >= max_iter or time.perf_counter() >= deadline:
                return (best_lower, *best), eps, it, tight(), potentials
            width = upper[0] - lower
            if width > 0.75 * prev_width or err < 1e-12:
                break
            prev_width, target = width, 0.25 * err
        eps *= min(0.5, max(0.05, 0.5 * tol * (best[0] - problem.floor) / max(best[0] - best_lower, 1e-300)))


def inf_convolution_bracket(
    x: Tensor,
    y: Tensor,
    divergence: str,
    lambda_: float,
    cost: str = "l2",
    tol: float = 0.01,
    max_seconds: float | None = 60.0,
    max_iter: int = 20_000,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> InfConvolutionBracket:
    """Certified bracket lower <= V <= upper on V = min_P' W_c(P^, P') + lambda D_f(P' || Q^), the best
    Lipschitz f-GAN critic's value GAN_{lambda f}(P^, Q^; H_c) on samples (see the module docstring).

    Args:
        x: (n, ...) samples of P^ (data), y: (m, ...) samples of Q^ (the model), flattened.
        divergence: a row with a 1-Lipschitz activation: kl, pearson, jensen_shannon, gan, total_variation.
        lambda_: lambda > 0.
        cost: "l2" (the theorem's metric) or "l1".
        tol: stop once (upper - lower) <= tol (upper - lambda f(1)).
        max_seconds, max_iter: budgets; when one runs out the bracket reached so far is returned with
            `converged=False` (it is certified all the same).
        backend, chunk_size: how the cost matrix is held (see `transport.matrix.CostMatrix`).
    Computed in float64 on x's device, outside autocast.
    """
    return _bracket_and_potentials(x, y, divergence, lambda_, cost, tol, max_seconds, max_iter, backend, chunk_size)[0]


def inf_convolution_potentials(
    x: Tensor,
    y: Tensor,
    divergence: str,
    lambda_: float,
    cost: str = "l2",
    tol: float = 0.01,
    max_seconds: float | None = 60.0,
    max_iter: int = 20_000,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, InfConvolutionBracket]:
    """(u, h, bracket): the critic of the bracket's lower end on the samples, u (n,) its values on the x_i
    and h (m,) on the y_j (float64), with the `inf_convolution_bracket` it comes from (same arguments).

    They are the values of one 1-Lipschitz function z -> max_i (u_i - c(x_i, z)) on x and on y (h is the
    c-transform of the solver's clipped potential, u that of h clipped at lambda f'(inf), both shifted by
    the best constant), and mean(u) - mean((lambda f)*(h)) = bracket.lower <= V, with the conjugate over
    u >= 0: the optimal critic up to the bracket's width, for instance as a regression target for a
    network critic (docs/theory.md 7).
    """
    bracket, potentials = _bracket_and_potentials(x, y, divergence, lambda_, cost, tol, max_seconds, max_iter,
                                                  backend, chunk_size)
    if potentials is None:  # no certificate was computed (a budget of zero passes)
        raise RuntimeError("inf_convolution_potentials: the solver stopped before its first certificate.")
    return potentials[0], potentials[1], bracket


def _bracket_and_potentials(
    x: Tensor, y: Tensor, divergence: str, lambda_: float, cost: str, tol: float, max_seconds: float | None,
    max_iter: int, backend: str, chunk_size: int | None,
) -> tuple[InfConvolutionBracket, tuple[Tensor, Tensor] | None]:
    start = time.perf_counter()
    check_inf_convolution_divergence(divergence)
    check_choice("cost", cost, METRIC_COSTS)
    check_choice("backend", backend, BACKENDS)
    if not (lambda_ > 0 and math.isfinite(lambda_)):
        raise ValueError(f"lambda_ must be a positive number, got {lambda_}.")
    if not 0 < tol < 1:
        raise ValueError(f"tol is a relative width in (0, 1), got {tol}.")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None (no limit), got {max_seconds}.")
    x2, y2 = flatten_samples(x, y)
    deadline = start + max_seconds if max_seconds is not None else math.inf
    with torch.no_grad(), torch.autocast(x2.device.type, enabled=False):
        problem = _Problem(CostMatrix(x2, y2, cost, backend, chunk_size), get_divergence(divergence, lambda_))
        certificate, eps, it, converged, potentials = _solve(problem, tol, max_iter, deadline)
        lower, upper, transport, penalty, off = certificate
    return InfConvolutionBracket(
        lower, upper, transport, penalty, off, eps, it, x2.shape[0], y2.shape[0], cost, divergence, float(lambda_),
        converged, time.perf_counter() - start,
    ), potentials
