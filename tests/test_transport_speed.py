"""The fast certified bracket's machinery against POT's exact value: float32 iterations on a held
kernel still certified, the multiscale start, the memory-budget layouts, the POT-or-Sinkhorn cost
model, and the float64 certificate of an arbitrary plan. Timings live in docs/BENCHMARKS.md."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from transport import multiscale
from transport.bracket import sinkhorn_upper_bound, wasserstein_bracket
from transport.certificate import certify_plan
from transport.costs import flatten_samples
from transport.exact import predicted_seconds, prefer_exact
from transport.kernel import KernelSinkhorn, LogSinkhorn
from transport.matrix import CostMatrix, Layout, choose_layout, memory_budget
from transport.solver import Problem, solve

pytestmark = pytest.mark.usefixtures("one_thread")


def clouds(n: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 1.1 * torch.randn(m, d, generator=g, dtype=torch.float64) + 1.0 / math.sqrt(d)
    return x, y


def pot_exact(x: torch.Tensor, y: torch.Tensor, cost: str) -> float:
    metric = {"l2sq": "sqeuclidean", "l2": "euclidean", "l1": "cityblock"}[cost]
    M = ot.dist(x.numpy(), y.numpy(), metric=metric)
    return float(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), M, numItermax=10**7))


def contains(bracket, exact: float) -> bool:
    return bracket.lower <= exact * (1 + 1e-9) and exact <= bracket.upper * (1 + 1e-9)


# ---- float32 iterations, float64 certificates ------------------------------------------------------


@pytest.mark.parametrize(
    "n, m, d, cost", [(700, 600, 2, "l2sq"), (400, 450, 3, "l1"), (500, 500, 64, "l2sq"), (300, 350, 784, "l2")]
)
def test_float32_iterations_still_bracket_the_exact_value(n, m, d, cost):
    x, y = clouds(n, m, d, seed=n + d)
    exact = pot_exact(x, y, cost)
    problem = Problem(*flatten_samples(x, y), cost)
    assert problem.layout == Layout(kernel=True, cost64=True)
    assert isinstance(problem.engine(torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)), KernelSinkhorn)
    result = solve(problem, tol=0.01)
    assert result.converged and result.lower <= exact * (1 + 1e-9) and exact <= result.upper * (1 + 1e-9)
    assert result.upper <= 1.0102 * exact and result.certificates >= 1


@pytest.mark.parametrize("blur", [0.05, 1.0])
def test_a_float32_kernel_after_one_update_is_still_certified(blur):
    """Far from converged, on a float32 kernel floored at exp(-60): both bounds still hold."""
    x, y = clouds(80, 70, 2, seed=3)
    exact = pot_exact(x, y, "l2sq")
    x2, y2 = flatten_samples(x, y)
    C = CostMatrix(x2, y2, "l2sq", "tensorized")
    a, b = torch.full((80,), 1 / 80, dtype=torch.float64), torch.full((70,), 1 / 70, dtype=torch.float64)
    engine = KernelSinkhorn(C, a, b, torch.zeros(80, dtype=torch.float64), torch.zeros(70, dtype=torch.float64))
    engine.set_eps(2 * blur**2)
    engine.iterate(0.0, 1)
    cert = certify_plan(C, engine.plan(), a, b, *engine.potentials(), engine.eps, entropic=True)
    assert cert.marginal_error > 1e-3
    assert cert.lower <= exact * (1 + 1e-12) <= cert.upper * (1 + 2e-12) and cert.entropic >= exact


def test_float64_passes_take_over_below_float32_resolution():
    """A marginal tolerance float32 cannot reach is still met (by float64 log-domain passes)."""
    x, y = clouds(60, 50, 3, seed=5)
    M = ot.dist(x.numpy(), y.numpy())
    reference = ot.solve(M, np.full(60, 1 / 60), np.full(50, 1 / 50), reg=0.5, max_iter=100_000, tol=1e-13).value
    ours = sinkhorn_upper_bound(x, y, blur=0.5, certified=False, marg_tol=1e-11, max_seconds=None)
    assert ours == pytest.approx(reference, rel=1e-8)


def test_every_tensor_stays_on_the_samples_device():
    x2, y2 = flatten_samples(*clouds(100, 90, 2, seed=9))
    problem = Problem(x2, y2, "l2sq")
    engine = problem.engine(torch.zeros(100, dtype=torch.float64), torch.zeros(90, dtype=torch.float64))
    engine.set_eps(0.1)
    engine.iterate(1e-3, 50)
    tensors = [engine.K, engine.u, engine.v, *engine.potentials(), problem.C.full, problem.a]
    assert all(t.device == x2.device for t in tensors)
    assert engine.K.dtype == torch.float32 and engine.potentials()[0].dtype == torch.float64
    before = engine.potentials()
    engine.set_eps(engine.eps)  # absorbing the scalings at the same eps keeps the plan
    for old, new in zip(before, engine.potentials()):
        assert torch.allclose(old, new, rtol=0, atol=1e-5 * 0.1)


# ---- the multiscale start -------------------------------------------------------------------------


def test_coarsen_clusters_with_weights_and_a_quantisation_scale():
    x, y = clouds(1000, 900, 2, seed=11)
    cx, ax, cy, by, q = multiscale.coarsen(*flatten_samples(x, y), "l2sq")
    assert 0 < len(cx) <= 250 and 0 < len(cy) <= 225
    assert float(ax.sum()) == pytest.approx(1.0) and float(by.sum()) == pytest.approx(1.0) and (ax > 0).all()
    assert 0 < q < 0.1  # about the squared spacing of 250 centres in a 2-D Gaussian


def test_multiscale_start_is_used_in_low_dimension_and_certified(monkeypatch):
    x, y = clouds(1200, 1000, 2, seed=12)
    exact = pot_exact(x, y, "l2sq")
    calls = []
    coarsen = multiscale.coarsen
    monkeypatch.setattr("transport.solver.coarsen", lambda *args: calls.append(args[0].shape[0]) or coarsen(*args))
    bracket = wasserstein_bracket(x, y, max_seconds=None)
    assert calls == [1200]  # one coarse level: 250 clusters per cloud, solved from eps-scaling
    assert bracket.converged and contains(bracket, exact) and bracket.relative_width <= 0.01
    calls.clear()
    plain = wasserstein_bracket(x, y, max_seconds=None, multiscale=False)
    assert not calls and plain.converged and contains(plain, exact)
    fixed = sinkhorn_upper_bound(x, y, blur=0.1, certified=False, marg_tol=1e-9, max_seconds=None)
    fixed_plain = sinkhorn_upper_bound(x, y, blur=0.1, certified=False, marg_tol=1e-9, max_seconds=None, multiscale=False)
    assert fixed == pytest.approx(fixed_plain, rel=1e-6)  # the same OT_eps, whatever the start
    assert not multiscale.use_multiscale(5000, 5000, 64) and multiscale.use_multiscale(5000, 5000, 2)


# ---- the memory budget -------------------------------------------------------------------------------


def test_memory_budget_chooses_what_is_held():
    n, m = 1000, 800
    assert choose_layout(n, m, "auto", 12 * n * m) == Layout(kernel=True, cost64=True)
    assert choose_layout(n, m, "auto", 12 * n * m - 1) == Layout(kernel=True, cost64=False)
    assert choose_layout(n, m, "auto", 4 * n * m - 1) == Layout(kernel=False, cost64=False)
    assert choose_layout(n, m, "tensorized", 0) == Layout(kernel=True, cost64=True)
    assert choose_layout(n, m, "chunked", 2**40) == Layout(kernel=False, cost64=False)
    assert 0 < memory_budget(torch.device("cpu"))
    x2, y2 = flatten_samples(*clouds(300, 200, 4, seed=13))
    kernel_only = Problem(x2, y2, "l2sq", budget=4 * 300 * 200)
    assert kernel_only.C.full is None and isinstance(kernel_only.engine(*kernel_only_zeros(300, 200)), KernelSinkhorn)
    assert isinstance(Problem(x2, y2, "l2sq", budget=0).engine(*kernel_only_zeros(300, 200)), LogSinkhorn)


def kernel_only_zeros(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)


# ---- POT or Sinkhorn -------------------------------------------------------------------------------


def test_cost_model_prefers_pot_for_small_problems_only(monkeypatch):
    cpu, budget = torch.device("cpu"), 2**34
    for d in (2, 64, 784):
        assert prefer_exact(100, 100, d, cpu, budget)
        assert not prefer_exact(16384, 16384, d, cpu, budget)
        small, large = predicted_seconds(1000, 1000, d), predicted_seconds(4000, 4000, d)
        assert large[0] > small[0] > 0 and large[1] > small[1] > 0
    assert not prefer_exact(100, 100, 2, cpu, 16 * 100 * 100 - 1)  # POT's matrix and plan must fit
    monkeypatch.setattr("transport.exact.pot_installed", lambda: False)
    assert not prefer_exact(100, 100, 2, cpu, budget)


def test_exact_auto_answers_with_pot_or_the_bracket_and_both_are_certified(monkeypatch):
    x, y = clouds(100, 90, 5, seed=14)
    exact = pot_exact(x, y, "l2sq")
    auto = wasserstein_bracket(x, y, exact="auto")
    assert auto.method == "exact" and auto.lower == auto.upper == pytest.approx(exact, rel=1e-12) and auto.eps == 0
    monkeypatch.setattr("transport.exact.predicted_seconds", lambda n, m, d: (1.0, 0.5))
    bracket = wasserstein_bracket(x, y, exact="auto", max_seconds=None)
    assert bracket.method == "sinkhorn" and bracket.converged and contains(bracket, exact)


# ---- CUDA (skipped without it; `python -m pytest tests -m gpu`) ---------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, d, backend", [(2000, 2, "auto"), (1500, 64, "auto"), (1500, 64, "chunked")])
def test_cuda_bracket_keeps_to_the_device_and_brackets_pot(n, d, backend):
    x, y = clouds(n, n, d, seed=20 + d)
    exact = pot_exact(x, y, "l2sq")
    bracket = wasserstein_bracket(x.cuda(), y.cuda(), max_seconds=None, backend=backend)
    assert bracket.method == "sinkhorn" and bracket.converged and contains(bracket, exact)
    problem = Problem(*flatten_samples(x.cuda(), y.cuda()), "l2sq", backend=backend)
    engine = problem.engine(torch.zeros(n, dtype=torch.float64, device="cuda"), torch.zeros(n, dtype=torch.float64, device="cuda"))
    assert all(t.device.type == "cuda" for t in (*engine.potentials(), problem.C.x, problem.a))
