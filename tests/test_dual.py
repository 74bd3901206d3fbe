"""The dual side as pure functions (maths.dual): critic outputs and dual values against the
registry's tables written out in numpy (tests/helpers.py), the certified dual value, which critics
are certified, the generator's two losses and f(1)."""

import math

import numpy as np
import pytest
import torch

from helpers import (
    LOG2,
    REF_LIPSCHITZ,
    ref_f,
    reference_dual_terms,
    reference_dual_value,
    reference_offset,
)
from maths.divergences import DIVERGENCE_NAMES, get_divergence
from maths.dual import (
    certified_dual_value,
    critic_output,
    dual_terms,
    dual_value,
    f_at_one,
    generator_loss,
    is_dual_certified,
)

SCALES = (1.0, 2.5)


def raw_outputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw critic outputs on 7 samples of P and 5 of Q (float64), spread over [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(7, generator=g, dtype=torch.float64) - 1, 2 * torch.rand(5, generator=g, dtype=torch.float64) - 1


@pytest.mark.parametrize("lam", SCALES)
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_dual_value_and_terms_against_the_tables(name, lam):
    """v = r / scale + lambda v0, h = lambda g_f(v / lambda), dual = E_P[h] - E_Q[lambda f*(g_f(v / lambda))]."""
    div = get_divergence(name, lam)
    raw_p, raw_q = raw_outputs(0)
    expected_offset = {"kl": 1.0}.get(name, 0.0)  # g_f^{-1}(f'(1)): the kl row's offset, 0 elsewhere
    assert reference_offset(name) == pytest.approx(expected_offset, abs=1e-12)
    for scale in (1.0, 3.0):
        torch.testing.assert_close(critic_output(div, raw_p, scale), raw_p / scale + lam * expected_offset,
                                   rtol=1e-15, atol=1e-15)
        on_p, on_q = dual_terms(div, raw_p, raw_q, scale)
        ref_p, ref_q = reference_dual_terms(name, lam, raw_p.numpy() / scale, raw_q.numpy() / scale)
        np.testing.assert_allclose(on_p.numpy(), ref_p, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(on_q.numpy(), ref_q, rtol=1e-12, atol=1e-14)
        value = dual_value(div, raw_p, raw_q, scale)
        assert value.dim() == 0 and value.dtype == torch.float64
        assert value.item() == pytest.approx(reference_dual_value(name, lam, raw_p.numpy() / scale,
                                                                  raw_q.numpy() / scale), rel=1e-12, abs=1e-14)


def test_dual_value_by_hand_for_kl():
    """lambda = 2, kl: v = r + 2, h = v, (lambda f)*(h) = 2 exp(h / 2 - 1)."""
    raw_p, raw_q = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    by_hand = (2.5 + 1.0) / 2 - 2 * (math.exp(0.0) + math.exp(0.5) + math.exp(-1.0)) / 3
    assert dual_value(get_divergence("kl", 2.0), raw_p, raw_q).item() == pytest.approx(by_hand, rel=1e-14)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_certified_dual_value_rescales_by_the_bound_or_is_nan(name):
    """The dual value of r / max(1, L) for rows with a 1-Lipschitz g_f; NaN for the others."""
    div = get_divergence(name, 1.5)
    raw_p, raw_q = raw_outputs(1)
    for bound in (0.5, 1.0, 4.0):
        value = certified_dual_value(div, raw_p, raw_q, bound).item()
        if REF_LIPSCHITZ[name] > 1.0:  # reverse_kl, neyman, hellinger: no certificate exists
            assert math.isnan(value)
            continue
        scale = max(1.0, bound)
        assert value == pytest.approx(reference_dual_value(name, 1.5, raw_p.numpy() / scale, raw_q.numpy() / scale),
                                      rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(
    "name, network_bound, metric, certified",
    [("kl", 1.0, True, True), ("kl", 1.01, True, False), ("kl", 0.5, False, False),
     ("total_variation", 1.8, True, True), ("total_variation", 2.2, True, False),  # slope 1/2: bound * 1/2 <= 1
     ("jensen_shannon", 0.9, True, True), ("gan", 0.9, True, True), ("hellinger", 0.1, True, False)],
)
def test_which_critics_are_certified(name, network_bound, metric, certified):
    """A metric cost, a 1-Lipschitz g_f, and the network's bound times the slope of g_f at most 1."""
    assert is_dual_certified(get_divergence(name, 3.0), network_bound, metric) is certified


@pytest.mark.parametrize("lam", SCALES)
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_generator_losses_against_the_tables(name, lam):
    """saturating: -E_Q[(lambda f)*(h)]; non_saturating: -E_Q[h]."""
    div = get_divergence(name, lam)
    _, raw_fake = raw_outputs(2)
    on_fake_h, on_fake_conjugate = reference_dual_terms(name, lam, raw_fake.numpy(), raw_fake.numpy())
    assert generator_loss(div, raw_fake, "saturating").item() == pytest.approx(-on_fake_conjugate.mean(), rel=1e-12)
    assert generator_loss(div, raw_fake, "non_saturating").item() == pytest.approx(-on_fake_h.mean(), rel=1e-12)
    assert generator_loss(div, raw_fake).item() == generator_loss(div, raw_fake, "saturating").item()


def test_generator_losses_of_the_gan_row_by_hand():
    """D = sigmoid(v): non-saturating -E log D = E softplus(-v), saturating E log(1 - D) = -E softplus(v)."""
    v = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    softplus = torch.log1p(torch.exp(v))
    assert generator_loss(get_divergence("gan"), v, "non_saturating").item() == pytest.approx(
        torch.log1p(torch.exp(-v)).mean().item(), rel=1e-14)
    assert generator_loss(get_divergence("gan"), v, "saturating").item() == pytest.approx(-softplus.mean().item(), rel=1e-14)


@pytest.mark.parametrize("lam", (1.0, 3.0))
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_f_at_one(name, lam):
    """lambda f(1): -lambda log 4 for gan, 0 for every other row."""
    expected = -lam * 2 * LOG2 if name == "gan" else 0.0
    assert float(lam * ref_f(name, 1.0)) == pytest.approx(expected, abs=1e-15)
    assert f_at_one(get_divergence(name, lam)) == pytest.approx(expected, abs=1e-15)
