"""Certified Wasserstein bounds (SPEC 5) against POT's exact `ot.emd2` and entropic `ot.solve`,
a brute force over permutations, every memory layout against the exact value, the Metric against
the function, and the callback in a real `Trainer.fit` on a module with only `sample`. The speed
machinery (float32 iterations, multiscale start, memory budget, POT-or-Sinkhorn) is tested in
tests/test_transport_speed.py."""

from __future__ import annotations

import itertools
import math
import sys

import lightning as L
import numpy as np
import ot
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.sinkhorn import SinkhornBoundCallback, WassersteinBound
from helpers import TrivialModule
from transport.bracket import WassersteinBracket, exact_wasserstein, sinkhorn_upper_bound, wasserstein_bracket
from transport.costs import flatten_samples
from transport.matrix import CostMatrix
from transport.sinkhorn import certify, sinkhorn

pytestmark = pytest.mark.usefixtures("one_thread")  # two torch threads ran these solvers 3-10x slower on 2 shared cores


def clouds(n: int, m: int, d: int, seed: int = 0, shift: float = 0.3, scale: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian clouds in float64: x ~ N(0, I), y ~ N(shift, scale^2 I)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = scale * torch.randn(m, d, generator=g, dtype=torch.float64) + shift
    return x, y


def pot_exact(x: torch.Tensor, y: torch.Tensor, cost: str) -> float:
    """The reference: POT's network simplex on POT's own cost matrix (not ours)."""
    xs, ys = x.reshape(len(x), -1).numpy(), y.reshape(len(y), -1).numpy()
    M = ot.dist(xs, ys, metric="sqeuclidean" if cost == "l2sq" else "euclidean")
    n, m = len(xs), len(ys)
    return float(ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), M, numItermax=10**7))


# ---- bounds against the exact value ----------------------------------------------------------


@pytest.mark.parametrize(
    "n, m, d, cost",
    [(300, 300, 2, "l2sq"), (250, 200, 2, "l2"), (400, 400, 16, "l2sq"), (300, 350, 64, "l2"), (200, 200, 784, "l2")],
)
def test_bounds_contain_exact_and_default_is_within_5_percent(n, m, d, cost):
    x, y = clouds(n, m, d)
    exact = pot_exact(x, y, cost)
    bracket = wasserstein_bracket(x, y, cost, max_seconds=None)
    assert bracket.lower <= exact * (1 + 1e-9) and exact <= bracket.upper * (1 + 1e-9)
    assert bracket.converged and bracket.relative_width <= 0.01
    assert (bracket.n, bracket.m, bracket.cost) == (n, m, cost)
    upper = sinkhorn_upper_bound(x, y, cost, max_seconds=None)
    assert exact <= upper <= 1.05 * exact
    entropic = sinkhorn_upper_bound(x, y, cost, certified=False, max_seconds=None)
    assert entropic >= exact


def test_bracket_reaches_one_percent_at_n1000_d784():
    x, y = clouds(1000, 1000, 784, seed=1)
    exact = pot_exact(x, y, "l2sq")
    lower, upper = bracket = wasserstein_bracket(x, y, "l2sq", tol=0.01, max_seconds=None)
    assert lower <= exact <= upper
    assert bracket.converged and bracket.relative_width <= 0.01
    assert upper <= 1.01 * exact and bracket.iterations >= 1 and bracket.eps > 0


@pytest.mark.parametrize("cost", ["l2sq", "l2", "l1"])
@pytest.mark.parametrize("blur", [0.02, 0.5, 5.0])
def test_certified_bound_valid_after_one_iteration(cost, blur):
    """Rounding makes any plan feasible: one Sinkhorn update (far from the marginals) still bounds."""
    x, y = clouds(60, 45, 3, seed=2)
    exact = exact_wasserstein(x, y, cost)
    for max_iter in (1, 2):
        assert sinkhorn_upper_bound(x, y, cost, blur=blur, max_iter=max_iter) >= exact * (1 - 1e-12)
        assert sinkhorn_upper_bound(x, y, cost, blur=blur, max_iter=max_iter, certified=False) >= exact * (1 - 1e-12)
    # the same with raw potentials from one update at eps, without any eps-scaling
    x2, y2 = flatten_samples(x, y)
    C = CostMatrix(x2, y2, cost)
    zeros = torch.zeros(60, dtype=torch.float64), torch.zeros(45, dtype=torch.float64)
    f, g, it, _, _ = sinkhorn(C, *zeros, eps=blur, max_iter=1)
    cert = certify(C, f, g, blur)
    assert it == 1 and cert.marginal_error > 1e-3  # far from converged, yet:
    assert cert.lower <= exact * (1 + 1e-12) <= cert.upper * (1 + 2e-12) and cert.entropic >= exact


def test_exact_matches_brute_force_over_permutations():
    x, y = clouds(6, 6, 5, seed=3)
    for cost, p in [("l2sq", 2), ("l2", 1)]:
        dist = torch.cdist(x, y) ** p
        brute = min(sum(dist[i, s[i]].item() for i in range(6)) / 6 for s in itertools.permutations(range(6)))
        assert exact_wasserstein(x, y, cost) == pytest.approx(brute, rel=1e-12)
        bracket = wasserstein_bracket(x, y, cost, exact=True)
        assert bracket.lower == bracket.upper == pytest.approx(brute, rel=1e-12) and bracket.converged


# ---- conventions: the factor of 2 in l2sq, and eps = 2 blur^2 --------------------------------


def test_l2sq_is_the_full_squared_distance():
    """POT's sqeuclidean cost is ||x - y||^2 in full; geomloss's legacy cost is half of it. A
    factor-of-2 slip would put the bound at 0.5x or 2x of POT's value."""
    x, y = clouds(120, 100, 5, seed=4)
    exact = pot_exact(x, y, "l2sq")
    upper = sinkhorn_upper_bound(x, y, "l2sq", max_seconds=None)
    assert exact <= upper <= 1.02 * exact
    # one point each: W = ||x - y||^2 exactly, by hand
    assert sinkhorn_upper_bound(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), "l2sq") == pytest.approx(25.0)
    assert sinkhorn_upper_bound(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), "l2") == pytest.approx(5.0)


@pytest.mark.parametrize("cost, blur", [("l2sq", 0.5), ("l2", 0.4)])
def test_entropic_value_matches_pot_with_eps_from_blur(cost, blur):
    """certified=False is OT_eps (debias off) with eps = 2 blur^2 (l2sq) or blur (l2), as POT's
    `ot.solve(M, a, b, reg=eps)` value <P, M> + eps KL(P || a b^T)."""
    x, y = clouds(60, 50, 3, seed=5)
    M = ot.dist(x.numpy(), y.numpy(), metric="sqeuclidean" if cost == "l2sq" else "euclidean")
    eps = 2 * blur**2 if cost == "l2sq" else blur
    reference = ot.solve(M, np.full(60, 1 / 60), np.full(50, 1 / 50), reg=eps, max_iter=100_000, tol=1e-13).value
    ours = sinkhorn_upper_bound(x, y, cost, blur=blur, certified=False, marg_tol=1e-11, max_seconds=None)
    assert ours == pytest.approx(reference, rel=1e-7)


# ---- backends, the dataclass, bad input --------------------------------------------------------


@pytest.mark.parametrize("cost", ["l2sq", "l2"])
def test_every_layout_certifies_the_exact_value(cost):
    """Kernel and float64 matrix held, the kernel alone (C recomputed), or neither (log-domain float32
    passes over recomputed blocks): all certified, all within tol, and at a fixed blur all reach the
    same entropic value."""
    x, y = clouds(150, 130, 8, seed=6)
    exact = pot_exact(x, y, cost)
    entries = 150 * 130
    layouts = [dict(backend="tensorized"), dict(backend="chunked", chunk_size=17),
               dict(memory_budget=4 * entries), dict(memory_budget=0)]
    values = []
    for layout in layouts:
        bracket = wasserstein_bracket(x, y, cost, max_seconds=None, **layout)
        assert bracket.lower <= exact * (1 + 1e-9) and exact <= bracket.upper * (1 + 1e-9)
        assert bracket.converged and bracket.relative_width <= 0.01
        values.append(sinkhorn_upper_bound(x, y, cost, blur=0.3, certified=False, marg_tol=1e-9, max_seconds=None, **layout))
    assert values == pytest.approx([values[0]] * len(values), rel=1e-7)
    assert min(values) >= exact


def test_chunked_cost_blocks_match_the_matrix():
    x2, y2 = flatten_samples(*clouds(150, 130, 8, seed=6))
    full = CostMatrix(x2, y2, "l2sq", "tensorized").full
    chunked = CostMatrix(x2, y2, "l2sq", "chunked", chunk_size=17)
    assert torch.cat([c.clone() for _, c in chunked.blocks()]) == pytest.approx(full, rel=1e-12, abs=1e-12)


def test_bracket_dataclass_unpacks_and_is_frozen():
    bracket = WassersteinBracket(1.0, 1.25, 0.1, 7, 10, 12, "l2", False)
    lower, upper = bracket
    assert (lower, upper) == (1.0, 1.25) and bracket.relative_width == pytest.approx(0.2)
    with pytest.raises(AttributeError):
        bracket.lower = 0.0


def test_time_budget_returns_the_width_reached():
    x, y = clouds(300, 300, 2, seed=7, shift=0.0, scale=1.0)  # W << max cost: slow to tighten
    bracket = wasserstein_bracket(x, y, tol=1e-4, max_iter=30)
    exact = pot_exact(x, y, "l2sq")
    assert not bracket.converged and bracket.relative_width > 1e-4
    assert bracket.lower <= exact <= bracket.upper


def test_bad_input_errors():
    x, y = clouds(10, 10, 3)
    with pytest.raises(ValueError, match="same number of features"):
        wasserstein_bracket(x, torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"Unknown cost 'cosine'\. Valid choices: l2, l2sq, l1\."):
        sinkhorn_upper_bound(x, y, cost="cosine")
    with pytest.raises(ValueError, match="NaN"):
        wasserstein_bracket(x, torch.full((10, 3), math.nan))
    with pytest.raises(ValueError, match="tensorized, chunked"):
        wasserstein_bracket(x, y, backend="keops")
    with pytest.raises(ValueError, match="blur"):
        sinkhorn_upper_bound(x, y, blur=0.0)
    with pytest.raises(ValueError, match="at least one sample"):
        wasserstein_bracket(x[:0], y)


def test_exact_without_pot_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r'pip install POT.*pip install -e "\.\[test\]"'):
        exact_wasserstein(*clouds(5, 5, 2))


def test_callbacks_and_transport_reexport_the_same_objects():
    import callbacks
    import callbacks.sinkhorn
    import transport
    import transport.bracket

    assert callbacks.wasserstein_bracket is callbacks.sinkhorn.wasserstein_bracket is transport.bracket.wasserstein_bracket
    assert callbacks.sinkhorn_upper_bound is callbacks.sinkhorn.sinkhorn_upper_bound is transport.bracket.sinkhorn_upper_bound
    assert callbacks.WassersteinBracket is transport.WassersteinBracket is transport.bracket.WassersteinBracket
    assert callbacks.WassersteinBound is WassersteinBound and callbacks.SinkhornBoundCallback is SinkhornBoundCallback
    assert transport.wasserstein_bracket is wasserstein_bracket and transport.exact_wasserstein is exact_wasserstein


# ---- the Metric ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric WassersteinBound was called before")
def test_metric_matches_function_over_several_updates():
    x, y = clouds(200, 160, 12, seed=8)
    metric = WassersteinBound(cost="l2", max_seconds=None, exact=False)
    for rows_x, rows_y in [(slice(0, 50), slice(0, 100)), (slice(50, 200), slice(100, 160))]:
        metric.update(x[rows_x].reshape(-1, 3, 4), y[rows_y])
    lower, upper = metric.compute()
    expected = wasserstein_bracket(x, y, "l2", max_seconds=None)
    assert lower.dtype == torch.float64 and lower.item() == pytest.approx(expected.lower, rel=1e-12)
    assert upper.item() == pytest.approx(expected.upper, rel=1e-12)
    assert metric.last_bracket.n == 200 and metric.last_bracket.m == 160
    with pytest.raises(ValueError, match="features"):
        metric.update(torch.randn(4, 5), torch.randn(4, 5))
    metric.reset()
    with pytest.raises(RuntimeError, match="update"):
        metric.compute()


def test_exact_auto_uses_pot_where_the_cost_model_prefers_it(monkeypatch):
    x, y = clouds(60, 50, 3, seed=2)
    auto = wasserstein_bracket(x, y, "l2", exact="auto")
    assert auto.method == "exact" and auto.lower == auto.upper == pytest.approx(exact_wasserstein(x, y, "l2"), rel=1e-12)
    monkeypatch.setattr("transport.bracket.prefer_exact", lambda *args: False)
    bracket = wasserstein_bracket(x, y, "l2", exact="auto", max_seconds=None)
    assert bracket.method == "sinkhorn" and bracket.eps > 0 and bracket.lower <= auto.lower <= bracket.upper
    with pytest.raises(ValueError, match="auto"):
        wasserstein_bracket(x, y, exact="yes")


# ---- the callback in a real Trainer.fit ------------------------------------------------------------


class SampleOnly(TrivialModule):
    """Only `sample(n)` (Gaussian samples N(shift, 1) of shape (1, 2, 2)) and a trivial training
    step that draws random numbers; it records what it generated and, if asked, logs a primal value."""

    def __init__(self, shift: float = 1.0, primal: float | None = None, cost: str | None = None) -> None:
        super().__init__()
        if cost is not None:
            self.save_hyperparameters("cost")
        self.shift, self.primal = shift, primal
        self.samples: list[torch.Tensor] = []
        self.train_draws: list[torch.Tensor] = []

    def sample(self, num_samples):
        out = self.shift + torch.randn(num_samples, 1, 2, 2)
        self.samples.append(out.clone())
        return out

    def training_step(self, batch, batch_idx):
        self.train_draws.append(torch.rand(1))
        return self.layer(torch.randn(3, 2)).square().mean()

    def validation_step(self, batch, batch_idx):
        if self.primal is not None:
            self.log("val/primal", self.primal)


class NoSample(SampleOnly):
    sample = None


def loaders(n_val: int = 90):
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(16, 1, 2, 2, generator=g), torch.zeros(16))
    val = TensorDataset(torch.randn(n_val, 1, 2, 2, generator=g), torch.zeros(n_val))
    return DataLoader(train, batch_size=8), DataLoader(val, batch_size=32), val.tensors[0]


def fit(model, callbacks, epochs=2):
    train, val, _ = loaders()
    torch.manual_seed(123)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=epochs, limit_train_batches=2, num_sanity_val_steps=1, callbacks=callbacks,
    )
    trainer.fit(model, train, val)
    return trainer


def test_callback_logs_certified_bracket_on_sample_only_module():
    callback = SinkhornBoundCallback(num_samples=70, every_n_epochs=1, batch_size=30, seed=5, max_seconds=None)
    model = SampleOnly(shift=1.0, primal=0.25)
    trainer = fit(model, [callback])
    metrics = trainer.callback_metrics
    real = loaders()[2][:70]  # the first 70 validation samples, kept for the run
    assert torch.equal(callback.held_out, real)
    # epoch 2's generated samples: 70 in calls of 30, 30, 10, seeded identically every epoch
    assert [len(s) for s in model.samples] == [30, 30, 10] * 2
    fake = torch.cat(model.samples[3:])
    assert torch.equal(fake, torch.cat(model.samples[:3]))
    exact = pot_exact(real.double(), fake.double(), "l2sq")
    lower, upper = metrics["val/w_lower"].item(), metrics["val/w_upper"].item()
    assert lower <= exact * (1 + 1e-6) and exact <= upper * (1 + 1e-6)
    assert (upper - lower) <= 0.011 * upper
    assert metrics["val/w_num_samples"].item() == 70
    assert metrics["val/w_upper_minus_primal"].item() == pytest.approx(upper - 0.25, rel=1e-5)


def test_callback_leaves_training_randomness_alone_and_skips_sanity_check():
    with_cb, without = SampleOnly(), SampleOnly()
    callback = SinkhornBoundCallback(num_samples=20, every_n_epochs=2)
    fit(with_cb, [callback], epochs=3)
    fit(without, [], epochs=3)
    assert torch.equal(torch.cat(with_cb.train_draws), torch.cat(without.train_draws))
    assert len(with_cb.samples) == 1  # epoch 2 only: not in the sanity check, not in epochs 1 and 3


def test_callback_uses_module_cost_and_refuses_missing_sample():
    callback = SinkhornBoundCallback(num_samples=30)
    fit(SampleOnly(cost="l2"), [callback], epochs=1)
    assert callback.metric.cost == "l2" and callback.last_bracket.cost == "l2"
    with pytest.raises(TypeError, match=r"sample\(num_samples\)"):
        fit(NoSample(), [SinkhornBoundCallback(num_samples=30)], epochs=1)
    with pytest.raises(ValueError, match="cost="):
        fit(SampleOnly(cost="cosine"), [SinkhornBoundCallback(num_samples=30)], epochs=1)


def test_geomloss_warm_start_gives_the_same_certified_bracket():
    """geomloss's potentials (its eps-scaling solve, temperature eps = blur^p with p = 1 on our C)
    are a valid start: the bracket still contains the exact value and agrees with the torch start."""
    x, y = clouds(200, 180, 10, seed=9)
    exact = pot_exact(x, y, "l2sq")
    geomloss = wasserstein_bracket(x, y, warm_start="geomloss", max_seconds=None)
    torch_start = wasserstein_bracket(x, y, warm_start="torch", max_seconds=None)
    assert geomloss.converged and geomloss.lower <= exact <= geomloss.upper
    assert geomloss.upper == pytest.approx(torch_start.upper, rel=0.01)
    fixed = sinkhorn_upper_bound(x, y, blur=0.5, certified=False, warm_start="geomloss", marg_tol=1e-10, max_seconds=None)
    reference = sinkhorn_upper_bound(x, y, blur=0.5, certified=False, marg_tol=1e-10, max_seconds=None)
    assert fixed == pytest.approx(reference, rel=1e-7)
