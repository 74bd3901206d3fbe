"""Tests of the f-divergence registry (SPEC section 3) against independent numpy/scipy references.

Every reference (f, f', g_f, its inverse, the fused f*(g_f) in tests/helpers.py; the closed-form
divergences here) is written from the SPEC tables, in float64, and never calls the module under test.
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, norm

from helpers import (
    REF_DOMAIN,
    REF_F_AT_ZERO,
    REF_F_PRIME_ONE,
    REF_LIPSCHITZ,
    ref_activation,
    ref_f,
    ref_f_prime,
    ref_fused,
    ref_inverse_activation,
)
from maths.divergences import DIVERGENCE_NAMES, FDivergence, get_divergence

NAMES = ("kl", "reverse_kl", "pearson", "neyman", "hellinger", "jensen_shannon", "gan", "total_variation")
SCALES = (1.0, 0.5, 3.0)


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype)


def _np(x):
    return x.detach().to(torch.float64).numpy()


# points t (unscaled) strictly inside dom f* whose maximiser u* lies well inside the brute-force grid;
# pearson stays at t >= -2: below, the table's t^2/4 + t is the conjugate of (u-1)^2 on all of R, not on u >= 0
CONJ_POINTS = {"kl": [-3, -1, 0, 1, 2.5], "reverse_kl": [-5, -1, -0.3], "pearson": [-1.5, 0, 1, 4],
               "neyman": [-5, -1, 0, 0.5, 0.9], "hellinger": [-3, -1, 0, 0.5, 0.75],
               "jensen_shannon": [-3, -1, 0, 0.5, 0.65], "gan": [-4, -1, -0.3, -0.05],
               "total_variation": [-0.45, -0.2, 0, 0.3, 0.45]}
U_GRID = np.unique(np.concatenate([np.logspace(-6, 3, 100001), np.linspace(1e-6, 30, 300001), [1.0]]))

# two discrete distributions on 5 points, with counts out of 20 (so samples can be repeated exactly)
P_COUNTS, Q_COUNTS = np.array([1, 2, 3, 4, 10]), np.array([5, 5, 4, 3, 3])
P, Q = P_COUNTS / 20.0, Q_COUNTS / 20.0
M = (P + Q) / 2


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    """Names in the SPEC order; unknown name lists every name; scale <= 0 is rejected."""
    assert tuple(DIVERGENCE_NAMES) == NAMES
    with pytest.raises(ValueError) as err:
        get_divergence("nope")
    for name in NAMES:
        assert name in str(err.value)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            get_divergence("kl", scale=bad)


@pytest.mark.parametrize("name", NAMES)
def test_attributes_and_scaled_equivalence(name):
    """domain, f'(1), Lipschitz constant vs the SPEC table; .scaled(lam) == get_divergence(name, lam)."""
    a, b = get_divergence(name).scaled(2.0), get_divergence(name, 2.0)
    assert isinstance(a, FDivergence) and a.name == b.name == name
    assert a.scale == pytest.approx(2.0) and b.scale == pytest.approx(2.0)
    assert get_divergence(name, 3.0).scaled(0.5).scale == pytest.approx(1.5)
    for lam, div in ((1.0, get_divergence(name)), (2.0, a), (2.0, b)):
        lo, hi = div.domain
        assert (lo, hi) == pytest.approx((lam * REF_DOMAIN[name][0], lam * REF_DOMAIN[name][1]))
        assert div.f_prime_one == pytest.approx(lam * REF_F_PRIME_ONE[name], abs=1e-12)
        assert div.activation_lipschitz == REF_LIPSCHITZ[name]
        assert div.is_activation_1_lipschitz == (REF_LIPSCHITZ[name] <= 1.0)
    u, v = _t(np.linspace(0.01, 5, 37)), _t(np.linspace(-4, 4, 41))
    for method, x in (("f", u), ("activation", v), ("conjugate_of_activation", v), ("conjugate", a.activation(v))):
        torch.testing.assert_close(getattr(a, method)(x), getattr(b, method)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", SCALES)
def test_neutral_output_is_mapped_to_f_prime_one(name, lam):
    """The constant the models add to their critics: activation(neutral_output) = lambda f'(1)."""
    div = get_divergence(name, lam)
    value = div.activation(torch.tensor(div.neutral_output, dtype=torch.float64))
    assert value.item() == pytest.approx(lam * REF_F_PRIME_ONE[name], abs=1e-12)


# ----------------------------------------------------------------------------- generator f
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", SCALES)
def test_f_against_table(name, lam):
    """lam*f(u) vs the table on a grid, f(1) = 0 (gan: -log 4), and the limit at u = 0."""
    div = get_divergence(name, lam)
    u = np.concatenate([np.logspace(-4, 3, 50), [1.0]])
    out = div.f(_t(u))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(_np(out), lam * ref_f(name, u), rtol=1e-10, atol=1e-12)
    expected_one = -math.log(4.0) * lam if name == "gan" else 0.0
    assert _np(div.f(_t([1.0])))[0] == pytest.approx(expected_one, abs=1e-12)
    assert _np(div.f(_t([0.0])))[0] == pytest.approx(lam * REF_F_AT_ZERO[name], abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", (1.0, 2.5))
def test_f_prime_one_numerically(name, lam):
    """f_prime_one vs a central difference of the module's f at 1 (tv: between the one-sided slopes)."""
    div, h = get_divergence(name, lam), 1e-6
    f0, fp, fm = (_np(div.f(_t([x])))[0] for x in (1.0, 1.0 + h, 1.0 - h))
    if name == "total_variation":
        right, left = (fp - f0) / h, (f0 - fm) / h
        assert right == pytest.approx(lam / 2, rel=1e-6) and left == pytest.approx(-lam / 2, rel=1e-6)
        assert left <= div.f_prime_one <= right and div.f_prime_one == 0.0
    else:
        assert div.f_prime_one == pytest.approx((fp - fm) / (2 * h), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", (1.0, 2.5))
def test_constant_critic_at_f_prime_one_gives_f_of_one(name, lam):
    """At P = Q the critic with activation = f'(1) gives D_f(P||P) = f(1) (gan: -log 4)."""
    div = get_divergence(name, lam)
    v0 = lam * ref_inverse_activation(name, REF_F_PRIME_ONE[name])
    v = _t(np.full(7, v0))
    np.testing.assert_allclose(_np(div.activation(v)), lam * REF_F_PRIME_ONE[name], atol=1e-12)
    est = div.variational_estimate(v, v)
    assert est.dim() == 0
    assert est.item() == pytest.approx(-math.log(4.0) * lam if name == "gan" else 0.0, abs=1e-12)


# ----------------------------------------------------------------------------- conjugate
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", SCALES)
def test_conjugate_against_brute_force_sup(name, lam):
    """(lam f)*(t) vs max over a fine u-grid of u t - lam f(u); +inf strictly outside dom."""
    div = get_divergence(name, lam)
    f_grid = lam * ref_f(name, U_GRID)
    t = lam * np.asarray(CONJ_POINTS[name], dtype=np.float64)
    got = _np(div.conjugate(_t(t)))
    for ti, gi in zip(t, got):
        vals = U_GRID * ti - f_grid
        k = int(np.argmax(vals))
        assert 0 < k < len(U_GRID) - 1, "maximiser at the edge of the grid: bad test point"
        assert gi >= vals[k] - 1e-9  # the grid sup is a lower bound of the true sup
        assert gi - vals[k] <= 2e-6 * (1.0 + abs(vals[k]))
    lo, hi = (lam * x for x in REF_DOMAIN[name])
    outside = [x for x in (hi + 0.1 * lam, hi + 2 * lam, lo - 0.1 * lam, lo - 2 * lam) if math.isfinite(x)]
    if outside:
        out = _np(div.conjugate(_t(outside)))
        assert np.all(np.isposinf(out)), out


# ----------------------------------------------------------------------------- activation
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", SCALES)
def test_activation_maps_into_domain(name, lam):
    """lam g_f(v/lam) vs the table, finite and in dom (lam f)* for |v| <= 30; open ends strict for |v/lam| <= 30."""
    div = get_divergence(name, lam)
    lo, hi = div.domain
    v = np.linspace(-30, 30, 601)
    out = _np(div.activation(_t(v)))
    np.testing.assert_allclose(out, lam * ref_activation(name, v / lam), rtol=1e-10, atol=1e-12)
    assert np.all(np.isfinite(out)) and np.all((out >= lo) & (out <= hi))
    out = _np(div.activation(_t(lam * v)))  # |v/lam| <= 30: 1 - exp(-30) is still < 1 in float64
    if name != "total_variation":  # the only closed domain
        assert np.all((out > lo) & (out < hi))
    if name != "jensen_shannon":  # no cancellation near v = 0 (log 2 - softplus(-v) cancels there by nature)
        tiny = lam * np.array([-1e-6, -1e-9, -1e-12, 1e-12, 1e-9, 1e-6])
        np.testing.assert_allclose(_np(div.activation(_t(tiny))), lam * ref_activation(name, tiny / lam), rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", (1.0, 2.0))
def test_float32_stability(name, lam):
    """activation and fused f*(g_f) in float32 for |v| <= 30 (|v| <= 1e4 where they grow at most polynomially):
    float32 dtype, finite, close to the float64 references."""
    div = get_divergence(name, lam)
    v = np.linspace(-30, 30, 601).astype(np.float32).astype(np.float64)  # exactly representable inputs
    for method, ref in (("activation", ref_activation), ("conjugate_of_activation", ref_fused)):
        out = getattr(div, method)(_t(v, torch.float32))
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all(), method
        np.testing.assert_allclose(_np(out), lam * ref(name, v / lam), rtol=2e-5, atol=1e-5)
    if name in ("pearson", "jensen_shannon", "gan", "total_variation"):  # at most polynomial growth:
        v = np.array([-1e4, -200, -100, -50, 50, 100, 200, 1e4])  # exp(-v) overflows; softplus forms do not
        for method, ref in (("activation", ref_activation), ("conjugate_of_activation", ref_fused)):
            out = getattr(div, method)(_t(v, torch.float32))
            assert torch.isfinite(out).all(), method
            np.testing.assert_allclose(_np(out), lam * ref(name, v / lam), rtol=1e-6, atol=1e-6)
        act, (lo, hi) = div.activation(_t(v, torch.float32)).numpy(), div.domain
        assert np.all((act >= np.float32(lo)) & (act <= np.float32(hi)))  # ends rounded to float32 (log 2 up)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", SCALES)
def test_fused_conjugate_of_activation(name, lam):
    """Fused lam f*(g_f(v/lam)) == conjugate(activation(v)) for |v| <= 5, and == the second SPEC table."""
    div = get_divergence(name, lam)
    v = np.linspace(-5, 5, 101)
    fused = div.conjugate_of_activation(_t(v))
    assert fused.dtype == torch.float64
    composed = div.conjugate(div.activation(_t(v)))
    np.testing.assert_allclose(_np(fused), _np(composed), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(_np(fused), lam * ref_fused(name, v / lam), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", (1.0, 2.0))
def test_activation_slope_matches_lipschitz_constant(name, lam):
    """Sup over v in [-30, 30] of a central-difference slope vs activation_lipschitz (inf: slope blows up)."""
    div, h = get_divergence(name, lam), 1e-5
    v = np.linspace(-30, 30, 6001)
    slope = (_np(div.activation(_t(v + h))) - _np(div.activation(_t(v - h)))) / (2 * h)
    lip = div.activation_lipschitz
    if math.isfinite(lip):
        assert slope.max() == pytest.approx(lip, rel=1e-4)
        assert slope.max() <= lip * (1 + 1e-6)
    else:
        assert lip == math.inf
        assert slope.max() > 1e5  # exp(30 / lam) at v = -30
        inner = slope[np.abs(v) <= 10].max()
        assert slope.max() > 100 * inner  # keeps growing with the range


# ----------------------------------------------------------------------------- variational bound
def _bound_at(div, v):
    """Variational value for critic outputs v on the 5 points: via weighted sums and via repeated samples."""
    vt = _t(v)
    weighted = float(np.sum(P * _np(div.activation(vt))) - np.sum(Q * _np(div.conjugate_of_activation(vt))))
    repeated = div.variational_estimate(_t(np.repeat(v, P_COUNTS)), _t(np.repeat(v, Q_COUNTS))).item()
    assert repeated == pytest.approx(weighted, rel=1e-11, abs=1e-10)
    return weighted


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", (1.0, 2.0))
def test_optimal_critic_attains_discrete_divergence(name, lam):
    """At T* = lam f'(p/q) the bound equals lam sum q f(p/q); random critics stay below it."""
    div = get_divergence(name, lam)
    exact = lam * float(np.sum(Q * ref_f(name, P / Q)))
    t_star = lam * ref_f_prime(name, P / Q)
    v_star = lam * ref_inverse_activation(name, t_star / lam)
    np.testing.assert_allclose(_np(div.activation(_t(v_star))), t_star, rtol=1e-10, atol=1e-12)
    assert _bound_at(div, v_star) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = v_star + rng.normal(scale=1.0, size=5)
        assert _bound_at(div, v) <= exact + 1e-12
        assert _bound_at(div, 3.0 * rng.normal(size=5)) <= exact + 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_module_f_gives_known_closed_forms(name):
    """sum q f(p/q) with the module's f vs textbook forms (scipy JS/entropy); js = 2 JS, gan = 2 JS - log 4."""
    js = jensenshannon(P, Q) ** 2  # natural log, 1/2 weights
    assert js == pytest.approx(0.5 * entropy(P, M) + 0.5 * entropy(Q, M), rel=1e-12)
    closed = {"kl": entropy(P, Q), "reverse_kl": entropy(Q, P), "pearson": np.sum((P - Q) ** 2 / Q),
              "neyman": np.sum((P - Q) ** 2 / P), "hellinger": np.sum((np.sqrt(P) - np.sqrt(Q)) ** 2),
              "jensen_shannon": 2 * js, "gan": 2 * js - math.log(4.0),
              "total_variation": 0.5 * np.sum(np.abs(P - Q))}[name]
    got = float(np.sum(Q * _np(get_divergence(name).f(_t(P / Q)))))
    assert got == pytest.approx(closed, rel=1e-10)


def test_kl_between_gaussians_with_optimal_critic():
    """KL(N(0,1) || N(1,2^2)) closed form vs the bound at T* = 1 + log p/q: quadrature and Monte Carlo."""
    div = get_divergence("kl")
    exact = math.log(2.0) + (1.0 + 1.0) / (2 * 4.0) - 0.5
    critic = lambda x: 1.0 + norm.logpdf(x, 0, 1) - norm.logpdf(x, 1, 2)  # noqa: E731
    x = np.linspace(-25, 25, 50001)
    dx = x[1] - x[0]
    v = _t(critic(x))
    quad = dx * (np.sum(norm.pdf(x, 0, 1) * _np(div.activation(v)))
                 - np.sum(norm.pdf(x, 1, 2) * _np(div.conjugate_of_activation(v))))
    assert quad == pytest.approx(exact, abs=1e-9)
    rng = np.random.default_rng(1)
    xp, xq = rng.normal(0, 1, 200_000), rng.normal(1, 2, 200_000)
    vp, vq = critic(xp), critic(xq)
    mc = div.variational_estimate(_t(vp), _t(vq)).item()
    se = math.sqrt(np.var(vp) / len(vp) + np.var(np.exp(vq - 1)) / len(vq))
    assert mc == pytest.approx(np.mean(vp) - np.mean(np.exp(vq - 1)), rel=1e-9)
    assert abs(mc - exact) < 4 * se and se < 0.01
    assert div.variational_estimate(_t(vp - 0.5), _t(vq - 0.5)).item() < exact  # a worse critic
