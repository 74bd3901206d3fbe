"""The exact dual on samples: inf_convolution_bracket against independent references (docs/theory.md 7).

V = min_P' W_c(P^, P') + lambda D_f(P' || Q^). References: POT's exact W_c (the limit lambda -> inf and
an upper bound for every lambda), the mean nearest-neighbour cost (kl, lambda -> 0), scipy's linear
programs for total_variation (the primal over (pi, s) and the dual over 1-Lipschitz critics bounded by
lambda / 2), a direct convex minimisation over the plan for tiny samples (kl, pearson), and the
certified dual values of the models' critics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from callbacks import inf_convolution_bracket as reexported
from lightning_modules.critic import Critic
from lightning_modules.networks import build_critic
from maths.divergences import get_divergence
from transport import exact_wasserstein
from transport.inf_convolution import SUPPORTED_DIVERGENCES, inf_convolution_bracket, inf_convolution_potentials

ROWS_WITH_ZERO_FLOOR = ("kl", "pearson", "jensen_shannon", "total_variation")  # f(1) = 0


def _samples(n: int, m: int, d: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.6 * torch.randn(m, d, generator=g, dtype=torch.float64) + 0.8
    return x, y


def _reference_plan_minimum(x: torch.Tensor, y: torch.Tensor, divergence: str, lam: float) -> float:
    """min over pi >= 0 with rows a of <pi, C> + lambda sum_j b_j f(q_j / b_j) (rows with f'(inf) = inf),
    by SLSQP on the plan's entries, from several starts."""
    n, m = len(x), len(y)
    C = torch.cdist(x, y).numpy()
    f = {"kl": lambda u: np.where(u > 0, u * np.log(np.maximum(u, 1e-300)), 0.0), "pearson": lambda u: (u - 1.0) ** 2}[divergence]

    def objective(p: np.ndarray) -> float:
        pi = p.reshape(n, m)
        q = pi.sum(0)
        return float((pi * C).sum() + lam * (f(q * m) / m).sum())

    rows = [{"type": "eq", "fun": lambda p, i=i: p.reshape(n, m)[i].sum() - 1.0 / n} for i in range(n)]
    best = math.inf
    for start in (np.full(n * m, 1.0 / (n * m)), np.eye(n, m).reshape(-1) / n + 1e-3):
        start = start / start.reshape(n, m).sum(1, keepdims=True).repeat(m, 1).reshape(-1) / n
        result = minimize(objective, start, method="SLSQP", bounds=[(0.0, None)] * (n * m), constraints=rows,
                          options={"ftol": 1e-14, "maxiter": 2000})
        best = min(best, result.fun)
    return best


def _reference_tv_primal(x: torch.Tensor, y: torch.Tensor, lam: float) -> float:
    """The total_variation problem as a linear program over (pi, s, t):
    min <pi, C> + lambda / 2 (sum_j t_j + sum_i s_i), pi 1 + s = a, t_j >= |q_j - b_j|."""
    n, m = len(x), len(y)
    C = torch.cdist(x, y).numpy().reshape(-1)
    cost = np.concatenate([C, np.full(n, lam / 2), np.full(m, lam / 2)])  # pi, s, t
    rows = np.zeros((n, n * m + n + m))
    for i in range(n):
        rows[i, i * m:(i + 1) * m] = 1.0
        rows[i, n * m + i] = 1.0
    q = np.zeros((m, n * m + n + m))
    for j in range(m):
        q[j, j:n * m:m] = 1.0
    t = np.zeros((m, n * m + n + m))
    t[:, n * m + n:] = np.eye(m)
    a_ub = np.vstack([q - t, -q - t])  # q - b <= t, b - q <= t
    b_ub = np.concatenate([np.full(m, 1.0 / m), np.full(m, -1.0 / m)])
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=rows, b_eq=np.full(n, 1.0 / n), bounds=(0, None), method="highs")
    assert result.status == 0
    return float(result.fun)


def _reference_tv_dual(x: torch.Tensor, y: torch.Tensor, lam: float) -> float:
    """sup over h 1-Lipschitz on the samples with |h| <= lambda / 2 of mean h(x) - mean h(y)."""
    z = torch.cat([x, y])
    n, m, k = len(x), len(y), len(x) + len(y)
    D = torch.cdist(z, z).numpy()
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    a_ub = np.zeros((len(pairs), k))
    for row, (i, j) in enumerate(pairs):
        a_ub[row, i], a_ub[row, j] = 1.0, -1.0
    b_ub = np.array([D[i, j] for i, j in pairs])
    c = -np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    result = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=(-lam / 2, lam / 2), method="highs")
    assert result.status == 0
    return float(-result.fun)


@pytest.mark.parametrize("divergence", SUPPORTED_DIVERGENCES)
def test_bracket_below_w_and_tight(divergence):
    """lower <= V <= W_c + lambda f(1) (P' = Q^), lower is a certified lower bound on W_c, and the width meets tol."""
    x, y = _samples(40, 30)
    w = exact_wasserstein(x, y, "l2")
    for lam in (0.1, 1.0, 10.0):
        bracket = inf_convolution_bracket(x, y, divergence, lam, tol=0.01)
        floor = lam * float(get_divergence(divergence).f(torch.tensor(1.0, dtype=torch.float64)))
        assert bracket.converged and bracket.relative_width <= 0.01
        assert bracket.lower <= bracket.upper + 1e-12
        assert bracket.lower <= w + floor + 1e-9 and bracket.lower <= w + 1e-9


@pytest.mark.parametrize("divergence", ["kl", "pearson", "jensen_shannon", "total_variation"])
def test_tends_to_w_as_lambda_grows(divergence):
    """POT's exact W_c bounds V from above for every lambda, and V reaches it as lambda grows."""
    x, y = _samples(30, 25, seed=1)
    w = exact_wasserstein(x, y, "l2")
    gaps = []
    for lam in (1.0, 10.0, 1000.0):
        bracket = inf_convolution_bracket(x, y, divergence, lam, tol=0.003)
        assert bracket.lower <= w + 1e-9
        gaps.append(w - bracket.upper)
    assert gaps[-1] <= 0.01 * w  # the upper end at lambda = 1000 within 1% of W_c (it is >= V and V <= W_c)
    assert gaps[0] > gaps[-1]


def test_small_lambda_limits():
    """lambda -> 0: kl tends to the mean nearest-neighbour cost; rows with finite f'(inf) tend to 0."""
    x, y = _samples(30, 20, seed=2)
    nearest = torch.cdist(x, y).min(1).values.mean().item()
    lam = 1e-4
    kl = inf_convolution_bracket(x, y, "kl", lam, tol=0.001)
    # W(P^, P') >= nearest for P' on Q^'s samples, and the nearest-neighbour P' has D_kl <= log m.
    assert kl.upper >= nearest - 1e-12 and kl.lower <= nearest + lam * math.log(len(y))
    assert kl.upper - nearest <= 2e-3 * nearest
    for divergence in ("jensen_shannon", "total_variation", "pearson"):
        bracket = inf_convolution_bracket(x, y, divergence, 1e-4, tol=0.01)
        if divergence == "pearson":  # f'(inf) = inf: V tends to the nearest-neighbour cost as for kl
            assert bracket.upper >= nearest - 1e-9
        else:  # V <= lambda (f(0) + f'(inf)): everything off Q^'s samples
            div = get_divergence(divergence, 1e-4)
            assert 0.0 <= bracket.upper <= float(div.f(torch.tensor(0.0, dtype=torch.float64))) + div.f_prime_infinity + 1e-15


@pytest.mark.parametrize("divergence", ROWS_WITH_ZERO_FLOOR)
def test_non_decreasing_in_lambda(divergence):
    """D_f >= 0 for these rows, so V(lambda) is non-decreasing: no bracket at a larger lambda lies below
    one at a smaller lambda."""
    x, y = _samples(30, 30, seed=3)
    brackets = [inf_convolution_bracket(x, y, divergence, lam, tol=0.005) for lam in (0.03, 0.3, 3.0, 30.0)]
    for small, large in zip(brackets, brackets[1:]):
        assert large.upper >= small.lower - 1e-12


def test_total_variation_against_both_linear_programs():
    """The total_variation problem is an LP; its dual is the f-GAN dual over 1-Lipschitz h with |h| <= lambda / 2.
    Both LPs (scipy) agree, and the bracket contains their value."""
    x, y = _samples(9, 8, seed=4)
    for lam in (0.3, 1.5, 6.0):
        primal, dual = _reference_tv_primal(x, y, lam), _reference_tv_dual(x, y, lam)
        assert primal == pytest.approx(dual, abs=1e-9)
        bracket = inf_convolution_bracket(x, y, "total_variation", lam, tol=1e-3)
        assert bracket.lower - 1e-9 <= primal <= bracket.upper + 1e-9
        assert bracket.upper - bracket.lower <= 1e-3 * bracket.upper + 1e-12


@pytest.mark.parametrize("divergence", ["kl", "pearson"])
def test_kl_and_pearson_against_a_direct_minimisation(divergence):
    """For n <= 6, V by SLSQP over the plan's entries lies inside the bracket."""
    x, y = _samples(5, 4, seed=5)
    for lam in (0.2, 2.0):
        reference = _reference_plan_minimum(x, y, divergence, lam)
        bracket = inf_convolution_bracket(x, y, divergence, lam, tol=1e-4)
        assert bracket.lower - 1e-6 <= reference <= bracket.upper + 1e-6


def test_gan_is_jensen_shannon_shifted_by_lambda_log_4():
    """f_gan(u) = f_js(u) - (u + 1) log 2, so D_gan = D_js - log 4 for probability measures: V_gan = V_js - lambda log 4."""
    x, y = _samples(30, 30, seed=6)
    lam = 3.0
    js = inf_convolution_bracket(x, y, "jensen_shannon", lam, tol=0.002)
    gan = inf_convolution_bracket(x, y, "gan", lam, tol=0.002)
    shift = lam * math.log(4.0)
    assert gan.lower + shift <= js.upper + 1e-9 and js.lower <= gan.upper + shift + 1e-9


@pytest.mark.parametrize("divergence", SUPPORTED_DIVERGENCES)
def test_certified_critics_never_exceed_the_upper_end(divergence):
    """Any critic in H_c has an f-GAN dual value <= V: the models' certified dual values (random
    spectrally normalised critics, table conjugates) stay below the bracket's upper end."""
    x, y = _samples(40, 40, d=3, seed=7)
    for lam, seed in ((0.5, 0), (5.0, 1)):
        torch.manual_seed(seed)
        critic = Critic(build_critic((3,), 32, spectral_norm=True).double(), get_divergence(divergence, lam), (3,))
        value = critic.certified_value(x, y).item()
        bracket = inf_convolution_bracket(x, y, divergence, lam, tol=0.01)
        assert value <= bracket.upper + 1e-9


@pytest.mark.parametrize("divergence", SUPPORTED_DIVERGENCES)
def test_potentials_are_a_1_lipschitz_critic_at_the_lower_end(divergence):
    """inf_convolution_potentials: the same bracket as inf_convolution_bracket, values u on x and h on y of
    one 1-Lipschitz function (every pair of the union of samples), u <= lambda f'(inf), and for rows whose
    registry conjugate is the conjugate over u >= 0 (kl, jensen_shannon) a dual value equal to the lower end."""
    x, y = _samples(35, 25, seed=8)
    for lam in (0.1, 3.0, 100.0):
        u, h, bracket = inf_convolution_potentials(x, y, divergence, lam, tol=0.01)
        reference = inf_convolution_bracket(x, y, divergence, lam, tol=0.01)
        assert (bracket.lower, bracket.upper) == (reference.lower, reference.upper)
        assert u.shape == (35,) and h.shape == (25,) and u.dtype == h.dtype == torch.float64
        values, points = torch.cat([u, h]), torch.cat([x, y])
        slopes = (values[:, None] - values[None, :]) / torch.cdist(points, points).fill_diagonal_(1.0)
        assert slopes.max().item() <= 1.0 + 1e-9
        div = get_divergence(divergence, lam)
        assert u.max().item() <= div.f_prime_infinity + 1e-12
        if divergence in ("kl", "jensen_shannon"):
            value = (u.mean() - div.conjugate(h).mean()).item()
            assert value == pytest.approx(bracket.lower, rel=1e-9, abs=1e-12)


def test_bad_input_names_the_choices():
    x, y = _samples(5, 5)
    with pytest.raises(ValueError, match="kl, pearson, jensen_shannon, gan, total_variation"):
        inf_convolution_bracket(x, y, "hellinger", 1.0)
    with pytest.raises(ValueError, match="Unknown divergence 'nope'"):
        inf_convolution_bracket(x, y, "nope", 1.0)
    with pytest.raises(ValueError, match="Valid choices: l2, l1"):
        inf_convolution_bracket(x, y, "kl", 1.0, cost="l2sq")
    with pytest.raises(ValueError, match="lambda_ must be a positive number"):
        inf_convolution_bracket(x, y, "kl", 0.0)
    assert reexported is inf_convolution_bracket
