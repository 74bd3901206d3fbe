"""Tests of costs, kernels, the unbiased MMD and the latent priors against numpy / plain-Python references."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from maths.mmd import DEFAULT_KERNEL_SCALES, KERNEL_NAMES, kernel_matrix, mmd_unbiased
from maths.priors import PRIOR_NAMES, prior_variance, sample_prior
from transport.costs import COST_NAMES, cost, pairwise_cost


def _t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def ref_cost(x, y, name):
    """Per-sample cost of flattened numpy samples (B, ...)."""
    d = (np.asarray(x) - np.asarray(y)).reshape(len(x), -1)
    return {"l2": np.sqrt((d**2).sum(1)), "l2sq": (d**2).sum(1), "l1": np.abs(d).sum(1)}[name]


def ref_kernel(a, b, kernel, scales, base_scale):
    """Kernel between two vectors, as a plain-Python sum over scales."""
    d2 = float(sum((ai - bi) ** 2 for ai, bi in zip(a, b)))
    if kernel == "imq":
        return sum(s * base_scale / (s * base_scale + d2) for s in scales)
    return sum(math.exp(-d2 / (s * base_scale)) for s in scales)


def ref_mmd_loops(x, y, kernel, scales, base_scale):
    """Unbiased MMD^2 by explicit double loops (x: n rows, y: m rows, lists of floats)."""
    n, m = len(x), len(y)
    k = lambda a, b: ref_kernel(a, b, kernel, scales, base_scale)  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def ref_mmd_biased(x, y, kernel, scales, base_scale):
    """Biased V-statistic MMD^2 (diagonal kept), vectorised numpy; used only to show the U-test has power."""
    def gram(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        if kernel == "imq":
            return sum(s * base_scale / (s * base_scale + d2) for s in scales)
        return sum(np.exp(-d2 / (s * base_scale)) for s in scales)
    return gram(x, x).mean() + gram(y, y).mean() - 2 * gram(x, y).mean()


# ----------------------------------------------------------------------------- costs
@pytest.mark.parametrize("name", ["l2", "l2sq", "l1"])
def test_cost_against_numpy(name):
    """cost on (B, C, H, W) samples vs the flattened numpy norm; float64 preserved; shape (B,)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3, 4, 5)), rng.normal(size=(6, 3, 4, 5))
    out = cost(_t(x), _t(y), name)
    assert out.shape == (6,) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref_cost(x, y, name), rtol=1e-12)
    assert cost(_t(x), _t(x), name).abs().max().item() == 0.0


def test_cost_default_is_l2sq_and_names():
    """Default cost is l2sq; the names are the SPEC's."""
    assert tuple(COST_NAMES) == ("l2", "l2sq", "l1")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    np.testing.assert_allclose(cost(_t(x), _t(y)).numpy(), ref_cost(x, y, "l2sq"), rtol=1e-12)


@pytest.mark.parametrize("name", ["l2", "l2sq", "l1"])
def test_pairwise_cost_against_loops(name):
    """pairwise_cost (N, M) vs a double loop of cost on single rows and vs numpy; pairwise(x, x) has a zero diagonal."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=(4, 2, 3, 3))
    out = pairwise_cost(_t(x), _t(y), name)
    assert out.shape == (5, 4) and out.dtype == torch.float64
    loops = np.array([[cost(_t(x[i:i + 1]), _t(y[j:j + 1]), name).item() for j in range(4)] for i in range(5)])
    ref = np.array([[ref_cost(x[i:i + 1], y[j:j + 1], name)[0] for j in range(4)] for i in range(5)])
    np.testing.assert_allclose(out.numpy(), loops, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)
    self_cost = pairwise_cost(_t(x), _t(x), name).numpy()
    assert np.all(np.isfinite(self_cost)) and np.all(self_cost >= 0)
    np.testing.assert_allclose(np.diag(self_cost), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", ["l2", "l1"])
def test_metric_costs_satisfy_triangle_inequality(name):
    """c(x, z) <= c(x, y) + c(y, z) on random triples (l2 and l1 are metrics); l2sq breaks it on a line."""
    rng = np.random.default_rng(3)
    x, y, z = (_t(rng.normal(size=(500, 8)) * rng.uniform(0.1, 3, size=(500, 1))) for _ in range(3))
    assert torch.all(cost(x, z, name) <= cost(x, y, name) + cost(y, z, name) + 1e-12)
    assert torch.all(cost(x, y, name) == cost(y, x, name))
    a, b, c = _t([[0.0]]), _t([[1.0]]), _t([[2.0]])
    assert cost(a, c, "l2sq").item() > cost(a, b, "l2sq").item() + cost(b, c, "l2sq").item()


@pytest.mark.parametrize("fn", [cost, pairwise_cost])
def test_cost_errors(fn):
    """Unknown name lists every cost name; mismatched sample shapes name both shapes."""
    x = torch.zeros(2, 7, 11)
    with pytest.raises(ValueError) as err:
        fn(x, x, "l3")
    for name in COST_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError) as err:
        fn(x, torch.zeros(2, 13))
    assert "11" in str(err.value) and "13" in str(err.value)


# ----------------------------------------------------------------------------- kernels and MMD
@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize("scales,base_scale", [(DEFAULT_KERNEL_SCALES, 1.0), ((0.5, 3.0), 2.5), ((1.0,), 0.3)])
def test_kernel_matrix_against_loops(kernel, scales, base_scale):
    """kernel_matrix vs a plain-Python double loop of sum_s C_s/(C_s + d2) (imq) or exp(-d2/C_s) (rbf)."""
    assert tuple(KERNEL_NAMES) == ("imq", "rbf")
    assert tuple(DEFAULT_KERNEL_SCALES) == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(6, 3)) + 0.5
    out = kernel_matrix(_t(x), _t(y), kernel=kernel, scales=scales, base_scale=base_scale)
    assert out.shape == (5, 6) and out.dtype == torch.float64
    ref = [[ref_kernel(x[i], y[j], kernel, scales, base_scale) for j in range(6)] for i in range(5)]
    np.testing.assert_allclose(out.numpy(), np.array(ref), rtol=1e-12)
    diag = kernel_matrix(_t(x), _t(x), kernel=kernel, scales=scales, base_scale=base_scale).diagonal()
    np.testing.assert_allclose(diag.numpy(), float(len(scales)), rtol=1e-12)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize("scales,base_scale", [(DEFAULT_KERNEL_SCALES, None), (DEFAULT_KERNEL_SCALES, 1.0),
                                               ((0.5, 3.0), 2.5), ((1.0,), None)])
def test_mmd_unbiased_against_loops(kernel, scales, base_scale):
    """mmd_unbiased vs the U-statistic by double loops in float64; base_scale None means 2 * dim."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(5, 4)) * 1.3 + 0.4
    ref = ref_mmd_loops(x.tolist(), y.tolist(), kernel, scales, 2.0 * 4 if base_scale is None else base_scale)
    out = mmd_unbiased(_t(x), _t(y), kernel=kernel, scales=scales, base_scale=base_scale)
    assert out.dim() == 0 and out.dtype == torch.float64
    assert out.item() == pytest.approx(ref, rel=1e-10, abs=1e-13)


def test_mmd_default_kernel_is_imq_and_errors():
    """Defaults: imq, DEFAULT_KERNEL_SCALES, base 2 dim; fewer than 2 samples on either side is rejected."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(8, 2))
    ref = ref_mmd_loops(x.tolist(), y.tolist(), "imq", DEFAULT_KERNEL_SCALES, 4.0)
    assert mmd_unbiased(_t(x), _t(y)).item() == pytest.approx(ref, rel=1e-10)
    for a, b in ((x[:1], y), (x, y[:1])):
        with pytest.raises(ValueError):
            mmd_unbiased(_t(a), _t(b))


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_is_unbiased(kernel):
    """Same law: mean of 300 U-statistics within 4 standard errors of 0 (some negative), while the
    biased V-statistic on the same draws is clearly positive; different laws: clearly positive."""
    gen = torch.Generator().manual_seed(7)
    n, dim, draws = 16, 3, 300
    same, biased, diff = [], [], []
    for _ in range(draws):
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        y = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        same.append(mmd_unbiased(x, y, kernel=kernel).item())
        biased.append(ref_mmd_biased(x.numpy(), y.numpy(), kernel, DEFAULT_KERNEL_SCALES, 2.0 * dim))
        diff.append(mmd_unbiased(x, y + 1.0, kernel=kernel).item())
    se = lambda a: np.std(a, ddof=1) / math.sqrt(len(a))  # noqa: E731
    assert abs(np.mean(same)) < 4 * se(same)
    assert min(same) < 0
    assert np.mean(biased) > 10 * se(biased)
    assert np.mean(diff) > 10 * se(diff) and np.mean(diff) > 5 * abs(np.mean(same))


# ----------------------------------------------------------------------------- priors
def test_prior_names_variance_and_errors():
    """prior_variance = (1, 1/dim, 1/3); unknown prior lists every name."""
    assert tuple(PRIOR_NAMES) == ("gaussian", "sphere", "cube")
    for dim in (1, 2, 8):
        assert prior_variance("gaussian", dim) == pytest.approx(1.0)
        assert prior_variance("sphere", dim) == pytest.approx(1.0 / dim)
        assert prior_variance("cube", dim) == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError) as err:
        sample_prior("laplace", 4, 2)
    for name in PRIOR_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["gaussian", "sphere", "cube"])
def test_prior_moments_and_support(name):
    """Empirical mean 0 and per-coordinate variance vs prior_variance, no correlation; sphere norms 1, cube in [-1, 1]."""
    n, dim = 40_000, 5
    z = sample_prior(name, n, dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert z.shape == (n, dim) and z.dtype == torch.float64
    z = z.numpy()
    var = prior_variance(name, dim)
    assert np.all(np.abs(z.mean(0)) < 5 * math.sqrt(var / n))
    np.testing.assert_allclose(z.var(0), var, rtol=0.05)
    cov = np.cov(z, rowvar=False)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.05 * var
    if name == "sphere":
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-12)
    if name == "cube":
        assert z.min() >= -1.0 and z.max() <= 1.0 and z.min() < -0.999 and z.max() > 0.999


@pytest.mark.parametrize("name,dim,law", [("gaussian", 4, stats.norm()), ("cube", 4, stats.uniform(-1, 2)),
                                          ("sphere", 3, stats.uniform(-1, 2))])
def test_prior_marginal_law(name, dim, law):
    """KS test of one coordinate: N(0,1); uniform on [-1,1]; on S^2 a coordinate is uniform on [-1,1] (Archimedes)."""
    z = sample_prior(name, 5000, dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for k in range(dim):
        assert stats.kstest(z[:, k].numpy(), law.cdf).pvalue > 1e-4


@pytest.mark.parametrize("name", ["gaussian", "sphere", "cube"])
def test_prior_seeded_reproducibility(name):
    """Same seed, same samples; another seed, other samples; default dtype is torch's default."""
    draw = lambda seed: sample_prior(name, 64, 3, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.allclose(draw(0), draw(1))
    assert draw(0).dtype == torch.get_default_dtype() and draw(0).shape == (64, 3)
