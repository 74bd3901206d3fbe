"""The critic-free Monte Carlo estimate of D_f(Q_Z || P_Z): log-space f, mixture densities, closed
forms for single Gaussians, numerical integrals for a 1-D mixture (every registry row), unbiasedness."""

import functools
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats

from helpers import REFERENCE_F, reference_generators
from maths.divergences import DIVERGENCE_NAMES, get_divergence
from maths.gaussian_codes import (
    LOG_VAR_RANGE,
    batch_monte_carlo_divergence,
    f_of_log_ratio,
    gaussian_code_parameters,
    importance_weighted_f,
    mixture_log_density,
    monte_carlo_divergence,
    prior_log_density,
    sample_mixture,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # vector operations: ~10x faster than on two shared threads


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- building blocks ---------------------------------------------------------------------------


MP_F = reference_generators(mpmath.log, mpmath.sqrt)  # f at 50 digits, for the large ratios where float64 formulas cancel


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_log_space_f_is_the_registry_f(name):
    log_ratio = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    expected = get_divergence(name).f(torch.exp(log_ratio))
    torch.testing.assert_close(f_of_log_ratio(name, log_ratio), expected, rtol=1e-10, atol=1e-12)
    reference = torch.from_numpy(REFERENCE_F[name](np.exp(log_ratio.numpy())))
    torch.testing.assert_close(f_of_log_ratio(name, log_ratio), reference, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_log_space_f_is_accurate_for_large_ratios(name):
    """Against 50-digit arithmetic for |log ratio| up to 60, where u log u - (u + 1) log(u + 1)
    written as is (the registry's f) loses most of its digits."""
    log_ratio = torch.linspace(-60.0, 60.0, 121, dtype=torch.float64)
    with mpmath.workdps(50):
        reference = [float(MP_F[name](mpmath.exp(mpmath.mpf(l)))) for l in log_ratio.tolist()]
    torch.testing.assert_close(f_of_log_ratio(name, log_ratio), torch.tensor(reference, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    with mpmath.workdps(50):  # the importance-weighted form 2 f(r) / (1 + r), out to |l| = 800
        log_ratio = torch.linspace(-800.0, 800.0, 161, dtype=torch.float64)
        reference = [float(2 * MP_F[name](mpmath.exp(mpmath.mpf(l))) / (1 + mpmath.exp(mpmath.mpf(l))))
                     for l in log_ratio.tolist()]
    torch.testing.assert_close(importance_weighted_f(name, log_ratio), torch.tensor(reference, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)


def test_log_space_f_stays_right_where_the_ratio_underflows():
    """exp(-1000) = 0 in float64; the log-space forms still give f at the true ratio."""
    l = torch.tensor([-1000.0], dtype=torch.float64)
    assert f_of_log_ratio("reverse_kl", l).item() == 1000.0  # the registry's -log(0) would be inf
    assert math.isinf(get_divergence("reverse_kl").f(torch.exp(l)).item())
    limits = {"kl": 0.0, "pearson": 1.0, "hellinger": 1.0, "jensen_shannon": math.log(2), "gan": 0.0,
              "total_variation": 0.5}  # f(0)
    for name, value in limits.items():
        assert f_of_log_ratio(name, l).item() == pytest.approx(value, abs=1e-12), name
    assert f_of_log_ratio("neyman", l).item() == math.inf  # the true value e^1000 overflows


def test_log_space_f_scales_with_lambda():
    l = torch.linspace(-3, 3, 7, dtype=torch.float64)
    scaled = f_of_log_ratio(get_divergence("hellinger", 2.5), l)
    torch.testing.assert_close(scaled, 2.5 * f_of_log_ratio("hellinger", l))
    weighted = importance_weighted_f(get_divergence("kl", 2.5), l)
    torch.testing.assert_close(weighted, 2.5 * importance_weighted_f("kl", l))


def test_mixture_log_density_is_the_average_of_the_component_densities():
    torch.manual_seed(0)
    mean, log_var = torch.randn(5, 3, dtype=torch.float64), 0.5 * torch.randn(5, 3, dtype=torch.float64)
    z = 2 * torch.randn(40, 3, dtype=torch.float64)
    reference = np.log(np.mean([
        stats.multivariate_normal(mean[i].numpy(), np.diag(log_var[i].exp().numpy())).pdf(z.numpy()) for i in range(5)
    ], axis=0))
    got = mixture_log_density(z, mean, log_var, chunk_elements=31)  # chunks of 2 draws: the chunked path
    np.testing.assert_allclose(got.numpy(), reference, rtol=1e-10)
    np.testing.assert_allclose(prior_log_density(z).numpy(), stats.multivariate_normal(np.zeros(3)).logpdf(z.numpy()),
                               rtol=1e-12)


def test_mixture_draws_have_the_mixture_moments():
    mean = torch.tensor([[-2.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    log_var = torch.log(torch.tensor([[0.25, 1.0], [4.0, 0.01]], dtype=torch.float64))
    z = sample_mixture(mean, log_var, 200_000, gen(0))
    torch.testing.assert_close(z.mean(0), mean.mean(0), atol=0.02, rtol=0)
    second = (log_var.exp() + mean**2).mean(0)  # E z^2 of the equal-weight mixture
    torch.testing.assert_close((z**2).mean(0), second, atol=0.05, rtol=0)


def test_gaussian_code_parameters_split_and_clamp():
    out = torch.tensor([[0.5, -1.0, -50.0, 50.0]])
    mean, log_var = gaussian_code_parameters(out)
    assert mean.tolist() == [[0.5, -1.0]] and log_var.tolist() == [list(LOG_VAR_RANGE)]
    with pytest.raises(ValueError, match=r"\(B, 2 d\)"):
        gaussian_code_parameters(torch.zeros(4, 3))


# ---- closed forms: one Gaussian N(mu, diag s^2) against N(0, I) in d = 3 ------------------------

MU = np.array([0.3, -0.5, 0.2])
S = np.array([0.9, 1.0, 1.1])  # pearson's variance needs s^2 < 4/3, neyman's s^2 > 2/3


def _square_ratio_integral(m1, v1, m2, v2):
    """int N(m1, v1)^2 / N(m2, v2) over R (per coordinate; needs 2 v2 > v1)."""
    mu, s2 = (m1 - m2) / np.sqrt(v2), v1 / v2
    return np.exp(mu**2 / (2 - s2)) / np.sqrt(s2 * (2 - s2))


def closed_form(name: str, mu=MU, s=S) -> float:
    """D_f(N(mu, diag s^2) || N(0, I)) with the registry's conventions."""
    v = s**2
    if name == "kl":
        return 0.5 * np.sum(v + mu**2 - 1 - np.log(v))
    if name == "reverse_kl":  # D_f with f = -log u is KL(P || Q)
        return np.sum(np.log(s) + (1 + mu**2) / (2 * v) - 0.5)
    if name == "pearson":  # int q^2 / p - 1
        return np.prod(_square_ratio_integral(mu, v, 0.0, 1.0)) - 1
    if name == "neyman":  # int p^2 / q - 1
        return np.prod(_square_ratio_integral(0.0, 1.0, mu, v)) - 1
    if name == "hellinger":  # 2 - 2 * Bhattacharyya coefficient
        return 2 - 2 * np.prod(np.sqrt(2 * s / (1 + v)) * np.exp(-(mu**2) / (4 * (1 + v))))
    if name == "total_variation":  # equal covariances only
        assert np.all(s == 1)
        return 2 * stats.norm.cdf(np.linalg.norm(mu) / 2) - 1
    raise KeyError(name)


@pytest.mark.parametrize("proposal", ["balanced", "prior"])
@pytest.mark.parametrize("name", ["kl", "reverse_kl", "pearson", "neyman", "hellinger", "total_variation"])
def test_single_gaussian_matches_the_closed_form(name, proposal):
    s = np.ones(3) if name == "total_variation" else S
    exact = closed_form(name, MU, s)
    mean = torch.tensor(MU)[None]  # (1, 3): a mixture of one component
    log_var = torch.tensor(np.log(s**2))[None]
    estimate = monte_carlo_divergence(name, mean, log_var, num_samples=400_000, generator=gen(1), proposal=proposal)
    print(f"{name} ({proposal}): Monte Carlo {estimate.value:.5f} +- {estimate.std_error:.5f}, closed form {exact:.5f}")
    assert estimate.std_error <= 0.03 * exact  # the comparison below is informative
    assert abs(estimate.value.item() - exact) <= 4 * estimate.std_error.item()


# ---- a 1-D mixture against a numerical integral, for every row ----------------------------------

MIX_MEAN = np.array([-1.0, 0.2, 1.0])
MIX_STD = np.array([0.5, 0.8, 1.0])  # neyman needs a component with s^2 > 2/3, pearson all s^2 < 4/3


@functools.cache
def mixture_integral(name: str) -> float:
    """int p(x) f(q(x) / p(x)) dx by scipy's quad, q the mixture, p = N(0, 1)."""
    f = REFERENCE_F[name]
    q = lambda x: np.mean(np.exp(-0.5 * ((x - MIX_MEAN) / MIX_STD) ** 2) / (MIX_STD * np.sqrt(2 * np.pi)))
    p = lambda x: np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    value, _ = integrate.quad(lambda x: p(x) * f(q(x) / p(x)), -15, 15, limit=400, epsabs=1e-11, epsrel=1e-10)
    return value


@pytest.mark.parametrize("proposal", ["balanced", "prior"])
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_one_dimensional_mixture_matches_the_numerical_integral(name, proposal):
    exact = mixture_integral(name)
    mean, log_var = torch.tensor(MIX_MEAN)[:, None], torch.tensor(np.log(MIX_STD**2))[:, None]  # (3, 1)
    estimate = monte_carlo_divergence(name, mean, log_var, num_samples=400_000, generator=gen(2), proposal=proposal)
    print(f"{name} ({proposal}): Monte Carlo {estimate.value:.5f} +- {estimate.std_error:.5f}, integral {exact:.5f}")
    assert estimate.std_error <= 0.03 * abs(exact)
    assert abs(estimate.value.item() - exact) <= 4 * estimate.std_error.item()


@pytest.mark.parametrize("name, proposal, draws", [("hellinger", "prior", 2), ("jensen_shannon", "prior", 2),
                                                    ("kl", "balanced", 4), ("pearson", "balanced", 4)])
def test_estimate_is_unbiased_with_the_fewest_draws(name, proposal, draws):
    """The mean of many 2- or 4-draw estimates hits the integral: no small-sample bias (a plug-in such
    as f(mean of ratios), or self-normalised weights, would be off here)."""
    exact = mixture_integral(name)
    mean, log_var = torch.tensor(MIX_MEAN)[:, None], torch.tensor(np.log(MIX_STD**2))[:, None]
    g = gen(3)
    values = torch.stack([monte_carlo_divergence(name, mean, log_var, draws, generator=g, proposal=proposal).value
                          for _ in range(4000)])
    std_error = values.std() / math.sqrt(len(values))
    print(f"{name} ({proposal}): mean of 4000 {draws}-draw estimates {values.mean():.4f} +- {std_error:.4f}, "
          f"integral {exact:.4f}")
    assert abs(values.mean().item() - exact) <= 4 * std_error.item()
    assert std_error <= 0.1 * exact


def test_balanced_proposal_sees_a_concentrated_posterior_that_prior_draws_miss():
    """N(mu, 0.05^2 I_8) against N(0, I_8), the shape of a trained Gaussian encoder's codes: D_kl is about
    20, but prior draws (almost) never land where q is, so the plain estimate reads ~0 with a tiny
    standard error; the balanced proposal gets it right."""
    mu, s = np.full(8, 0.3), np.full(8, 0.05)
    exact = closed_form("kl", mu, s)
    mean, log_var = torch.tensor(mu)[None], torch.tensor(np.log(s**2))[None]
    balanced = monte_carlo_divergence("kl", mean, log_var, 4096, generator=gen(5))
    plain = monte_carlo_divergence("kl", mean, log_var, 4096, generator=gen(5), proposal="prior")
    print(f"D_kl {exact:.3f}: balanced {balanced.value:.3f} +- {balanced.std_error:.3f}, "
          f"prior {plain.value:.3g} +- {plain.std_error:.3g}")
    assert abs(balanced.value.item() - exact) <= 4 * balanced.std_error.item() and balanced.std_error < 0.01 * exact
    assert plain.value < 0.01 * exact


def test_scaled_divergence_scales_the_estimate():
    mean, log_var = torch.tensor(MIX_MEAN)[:, None], torch.tensor(np.log(MIX_STD**2))[:, None]
    plain = monte_carlo_divergence("kl", mean, log_var, num_samples=1000, generator=gen(4))
    scaled = monte_carlo_divergence(get_divergence("kl", 3.0), mean, log_var, num_samples=1000, generator=gen(4))
    torch.testing.assert_close(scaled.value, 3.0 * plain.value)
    assert plain.num_samples == 1000 and plain.value.dtype == torch.float64


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prior, why", [("sphere", "no density with respect to Lebesgue"), ("cube", "bounded|outside")])
def test_priors_without_a_usable_density_are_refused_with_the_reason(prior, why):
    with pytest.raises(ValueError, match=why):
        monte_carlo_divergence("kl", torch.zeros(2, 2), torch.zeros(2, 2), prior=prior)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="jensen_shannon"):
        monte_carlo_divergence("kullback", torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="laplace.*gaussian"):
        monte_carlo_divergence("kl", torch.zeros(2, 2), torch.zeros(2, 2), prior="laplace")
    with pytest.raises(ValueError, match="at least 2"):
        monte_carlo_divergence("kl", torch.zeros(2, 2), torch.zeros(2, 2), num_samples=1, proposal="prior")
    with pytest.raises(ValueError, match="at least 4"):
        monte_carlo_divergence("kl", torch.zeros(2, 2), torch.zeros(2, 2), num_samples=3)
    with pytest.raises(ValueError, match="balanced, prior"):
        monte_carlo_divergence("kl", torch.zeros(2, 2), torch.zeros(2, 2), proposal="posterior")
    with pytest.raises(ValueError, match=r"mean \(N, d\) and log_var \(N, d\)"):
        monte_carlo_divergence("kl", torch.zeros(2, 2), torch.zeros(2, 3))


# ---- the differentiable batch estimate (PrimalDual's training_estimator="monte_carlo") -------------


def batch_estimates(name: str, mean: torch.Tensor, log_var: torch.Tensor, runs: int, num_prior: int, seed: int):
    """`runs` independent batch estimates (one reparameterised draw per component each) and the
    gradients of each with respect to mean and log_var (leaves of shape (N, d), expanded or not)."""
    torch.manual_seed(seed)
    values, grad_mean, grad_log_var = [], [], []
    for _ in range(runs):
        m, lv = mean.clone().requires_grad_(True), log_var.clone().requires_grad_(True)
        codes = m + torch.exp(0.5 * lv) * torch.randn_like(m)
        value = batch_monte_carlo_divergence(name, m, lv, codes, torch.randn(num_prior, m.shape[1], dtype=m.dtype))
        gm, glv = torch.autograd.grad(value, (m, lv))
        values.append(value.detach()), grad_mean.append(gm), grad_log_var.append(glv)
    return torch.stack(values), torch.stack(grad_mean), torch.stack(grad_log_var)


@pytest.mark.parametrize("name", ["kl", "pearson", "jensen_shannon"])
def test_batch_estimate_is_unbiased_for_the_batch_mixture(name):
    """Mean of many estimates for the 3-component 1-D mixture (one code per component, 4 prior draws)
    against the numerical integral of D_f(Q_B || P_Z)."""
    exact = mixture_integral(name)
    mean, log_var = torch.tensor(MIX_MEAN)[:, None], torch.tensor(np.log(MIX_STD**2))[:, None]
    values, _, _ = batch_estimates(name, mean, log_var, runs=4000, num_prior=4, seed=7)
    std_error = values.std() / math.sqrt(len(values))
    print(f"{name}: mean of 4000 batch estimates {values.mean():.4f} +- {std_error:.4f}, integral {exact:.4f}")
    assert abs(values.mean().item() - exact) <= 4 * std_error.item()
    assert std_error <= 0.1 * exact


@pytest.mark.parametrize("name", ["kl", "hellinger"])
def test_batch_estimate_gradient_is_the_gradient_of_the_divergence(name):
    """B identical components are one Gaussian N(mu, diag s^2): the gradient of the estimate with
    respect to mu and log s^2 (summed over the B copies) against the closed form's, by central
    finite differences of `closed_form` (numpy, independent of the code under test)."""
    batch, runs = 256, 200
    mean = torch.tensor(MU)[None].expand(batch, -1).contiguous()  # (B, 3), every row mu
    log_var = torch.tensor(np.log(S**2))[None].expand(batch, -1).contiguous()
    _, grad_mean, grad_log_var = batch_estimates(name, mean, log_var, runs=runs, num_prior=batch, seed=8)
    for grads, reference in ((grad_mean.sum(dim=1), [
        (closed_form(name, MU + h * e, S) - closed_form(name, MU - h * e, S)) / (2 * h) for e in np.eye(3) for h in [1e-5]
    ]), (grad_log_var.sum(dim=1), [
        (closed_form(name, MU, S * np.exp(h * e / 2)) - closed_form(name, MU, S * np.exp(-h * e / 2))) / (2 * h)
        for e in np.eye(3) for h in [1e-5]
    ])):
        estimate, std_error = grads.mean(dim=0), grads.std(dim=0) / math.sqrt(runs)  # (3,), (3,)
        reference = torch.tensor(reference)
        print(f"{name}: gradient {estimate.numpy().round(4)} +- {std_error.numpy().round(4)}, exact {reference.numpy().round(4)}")
        assert torch.all((estimate - reference).abs() <= 4 * std_error + 1e-6)
        assert torch.all(std_error <= 0.1 * reference.abs() + 0.01)  # precise enough to catch a wrong sign or factor


def test_batch_estimate_refuses_mismatched_shapes():
    mean = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="one shape"):
        batch_monte_carlo_divergence("kl", mean, mean, torch.zeros(3, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"prior_draws must have shape \(M, 2\)"):
        batch_monte_carlo_divergence("kl", mean, mean, mean, torch.zeros(5, 3))
