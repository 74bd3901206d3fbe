"""lightning_modules.critic.Critic: a network read through a registry row. Its output, value,
objective, terms, losses and certified value against the registry's tables written out in numpy
(tests/helpers.py), applied to a network whose weights the test knows; its Lipschitz bounds against
the operator norms of those weights; its measured Lipschitz estimate against a loop over pairs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import REF_LIPSCHITZ, ref_activation, reference_dual_terms, reference_dual_value, reference_offset
from lightning_modules.critic import Critic
from maths.divergences import get_divergence
from maths.layers import Squeeze

ROWS = [("kl", 1.5), ("jensen_shannon", 2.0), ("total_variation", 1.0), ("hellinger", 1.0), ("gan", 3.0)]


def weights(seed: int = 0) -> tuple[np.ndarray, ...]:
    """W1 (4, 3), b1 (4,), w2 (4,), b2: a critic 3 -> 4 -> 1 whose Lipschitz constant exceeds 1."""
    rng = np.random.default_rng(seed)
    return 1.5 * rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=4), float(rng.normal())


def _reference_network(w: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    """r(x) = w2 . tanh(W1 x + b1) + b2, (N, 3) -> (N,)."""
    w1, b1, w2, b2 = w
    return np.tanh(x @ w1.T + b1) @ w2 + b2


def _reference_network_bound(w: tuple[np.ndarray, ...]) -> float:
    """||W1||_2 * ||w2||: tanh is 1-Lipschitz."""
    return float(np.linalg.norm(w[0], 2) * np.linalg.norm(w[2]))


def network(w: tuple[np.ndarray, ...]) -> nn.Module:
    w1, b1, w2, b2 = (torch.from_numpy(np.atleast_1d(a)) for a in w)
    first, last = nn.Linear(3, 4, dtype=torch.float64), nn.Linear(4, 1, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(w1), first.bias.copy_(b1), last.weight.copy_(w2[None]), last.bias.copy_(b2)
    return nn.Sequential(first, nn.Tanh(), last, Squeeze())


def samples(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name, lam", ROWS)
def test_output_value_objective_and_terms(name, lam):
    """forward: r; output: v = r + lambda v0 (lambda for kl); value: h = lambda g_f(v / lambda);
    objective: E_P[h] - E_Q[(lambda f)*(h)]; terms(scale): the per-sample terms of r / scale."""
    w = weights()
    critic = Critic(network(w), get_divergence(name, lam), (3,))
    p, q = samples(1, 9), samples(2, 6)
    raw_p, raw_q = _reference_network(w, p.numpy()), _reference_network(w, q.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(critic(p).numpy(), raw_p, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(critic.output(p).numpy(), raw_p + lam * reference_offset(name), rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(critic.value(p).numpy(), lam * ref_activation(name, raw_p / lam + reference_offset(name)),
                                   rtol=1e-12, atol=1e-14)
        assert critic.objective(p, q).item() == pytest.approx(reference_dual_value(name, lam, raw_p, raw_q), rel=1e-12)
        for got, expected in zip(critic.terms(p, q, scale=2.0), reference_dual_terms(name, lam, raw_p / 2, raw_q / 2)):
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, lam", ROWS)
def test_losses(name, lam):
    """loss: (-objective, objective, None) without a penalty; the generator's losses: -E_Q of the
    conjugate term (saturating) or of h (non_saturating)."""
    w = weights()
    critic = Critic(network(w), get_divergence(name, lam), (3,))
    real, fake = samples(3, 8), samples(4, 8)
    loss, objective, grad_norm = critic.loss(real, fake)
    expected = reference_dual_value(name, lam, _reference_network(w, real.numpy()), _reference_network(w, fake.numpy()))
    assert grad_norm is None and objective.item() == pytest.approx(expected, rel=1e-12) and loss.item() == -objective.item()
    loss.backward()  # differentiable in the network's weights
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in critic.parameters())
    raw_fake = _reference_network(w, fake.numpy())
    on_h, on_conjugate = reference_dual_terms(name, lam, raw_fake, raw_fake)
    assert critic.generator_loss(fake, "saturating").item() == pytest.approx(-on_conjugate.mean(), rel=1e-12)
    assert critic.generator_loss(fake, "non_saturating").item() == pytest.approx(-on_h.mean(), rel=1e-12)


def test_gradient_penalty_of_a_linear_kl_critic_is_closed_form():
    """kl: h(x) = <w, x> + b + lambda, whose gradient is w everywhere: penalty (||w|| - 1)^2 and mean
    gradient norm ||w||, whatever the interpolates."""
    linear = nn.Linear(2, 1, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, -4.0]])), linear.bias.fill_(0.5)  # ||w|| = 5
    critic = Critic(nn.Sequential(linear, Squeeze()), get_divergence("kl", 2.0), (2,))
    real, fake = samples(5, 16)[:, :2], samples(6, 16)[:, :2]
    loss, objective, grad_norm = critic.loss(real, fake, gp_weight=0.1)
    assert grad_norm.item() == pytest.approx(5.0, rel=1e-12)
    assert loss.item() == pytest.approx(-objective.item() + 0.1 * 16.0, rel=1e-12)


@pytest.mark.parametrize("name, lam", ROWS)
def test_lipschitz_bounds_and_certified_value(name, lam):
    """network_bound = ||W1|| ||w2||; lipschitz_bound = that times the slope of g_f (inf for
    hellinger); certified_value = the dual value of r / max(1, bound), NaN without a certificate."""
    w = weights()
    critic = Critic(network(w), get_divergence(name, lam), (3,))
    bound = _reference_network_bound(w)
    assert bound > 1.5  # the rescaling matters
    assert critic.network_bound() == pytest.approx(bound, rel=1e-6)
    slope = REF_LIPSCHITZ[name]
    assert critic.lipschitz_bound() == (math.inf if math.isinf(slope) else pytest.approx(bound * slope, rel=1e-6))
    assert critic.lipschitz_bound(network_bound=2.0) == 2.0 * slope
    real, fake = samples(7, 10), samples(8, 12)
    raw_real, raw_fake = _reference_network(w, real.numpy()), _reference_network(w, fake.numpy())
    for network_bound in (None, 0.5, 4.0):
        value = critic.certified_value(real, fake, network_bound).item()
        if slope > 1.0:
            assert math.isnan(value)
            continue
        scale = max(1.0, bound if network_bound is None else network_bound)
        assert value == pytest.approx(reference_dual_value(name, lam, raw_real / scale, raw_fake / scale), rel=1e-6)


def test_evaluation_leaves_the_modes_alone():
    critic = Critic(network(weights()), get_divergence("kl"), (3,))
    critic.network[1].eval()  # a submodule frozen in eval mode stays so
    critic.certified_value(samples(9, 4), samples(10, 4))
    critic.pair_lipschitz_estimate(samples(9, 4), samples(10, 4))
    assert critic.training and critic.network[0].training and not critic.network[1].training


def test_pair_lipschitz_estimate_is_the_largest_ratio_over_the_pairs():
    """max |h(x) - h(y)| / ||x - y|| over (real_i, fake_i) and (real_i, real_{i-1}), by a loop."""
    w = weights(1)
    critic = Critic(network(w), get_divergence("jensen_shannon", 2.0), (3,))
    real, fake = samples(11, 6).numpy(), samples(12, 6).numpy()

    def h(x):
        v = _reference_network(w, x[None])[0] + 2.0 * reference_offset("jensen_shannon")
        return 2.0 * ref_activation("jensen_shannon", v / 2.0)

    pairs = [(real[i], fake[i]) for i in range(6)] + [(real[i], real[i - 1]) for i in range(6)]
    expected = max(abs(h(x) - h(y)) / np.linalg.norm(x - y) for x, y in pairs)
    got = critic.pair_lipschitz_estimate(torch.from_numpy(real), torch.from_numpy(fake)).item()
    assert got == pytest.approx(expected, rel=1e-10)
    assert got <= critic.lipschitz_bound()
