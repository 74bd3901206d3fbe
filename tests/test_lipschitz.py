"""Tests of layer operator norms and the certified Lipschitz bound (SPEC section 4) against explicit
matrices (numpy SVD), closed forms, autograd gradient norms and brute-force pair ratios."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lightning_modules.networks import build_critic
from maths.layers import MaxMin, Squeeze
from maths.lipschitz import _top_eigenvalue, empirical_lipschitz, linear_operator_norm, lipschitz_upper_bound

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 convolutions: ~1000x slower on 2 threads


def explicit_singular_values(linear_map, input_shape):
    """Singular values (descending) of the matrix of a linear map, built column by column from basis inputs."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)  # (n, *input_shape)
    with torch.no_grad():
        matrix = linear_map(basis).reshape(n, -1).numpy()  # row i = map(e_i)
    return np.linalg.svd(matrix, compute_uv=False)


def conv_without_bias(conv):
    weight = conv.weight.detach().double()
    return lambda x: conv._conv_forward(x, weight, None)


def sn_state(layer):
    sn = layer.parametrizations.weight
    return [t.detach().clone() for t in (sn[0]._u, sn[0]._v, sn.original)]


def test_linear_equals_matrix_norm():
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).double()
    w = layer.weight.detach()
    value = linear_operator_norm(layer, (7,))
    assert value == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-6)
    assert value == pytest.approx(np.linalg.svd(w.numpy(), compute_uv=False)[0], rel=1e-6)
    sn = spectral_norm(nn.Linear(7, 5).double())  # parametrized: the effective (eval-mode) weight
    with torch.no_grad():
        sn.eval()
        expected = np.linalg.svd(sn.weight.numpy(), compute_uv=False)[0]
    assert linear_operator_norm(sn, (7,)) == pytest.approx(expected, rel=1e-6)


CONV_CONFIGS = [  # (in, out, kernel, stride, padding, size, extra)
    (1, 1, 3, 1, 1, 8, {}),
    (1, 3, 4, 1, 0, 6, {}),
    (2, 3, 4, 2, 1, 8, {}),
    (3, 2, 3, 2, 0, 7, {}),
    (3, 3, 3, 1, 1, 8, {}),
    (2, 2, 4, 2, 1, 6, {}),
    (1, 2, 3, 2, 1, 7, {}),
    (2, 2, 3, 1, 2, 6, {"dilation": 2, "groups": 2}),
    (2, 3, 3, 1, 1, 6, {"padding_mode": "circular"}),
]


@pytest.mark.parametrize("cin, cout, k, s, p, size, extra", CONV_CONFIGS)
def test_conv2d_matches_explicit_matrix(cin, cout, k, s, p, size, extra):
    torch.manual_seed(cin * 100 + cout * 10 + k + s + p + size)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, **extra)
    true = explicit_singular_values(conv_without_bias(conv), (cin, size, size))[0]
    value = linear_operator_norm(conv, (cin, size, size))
    assert value == pytest.approx(true, rel=1e-4)
    assert value >= true  # converged from below, then the safety margin


def test_conv1d_and_avgpool():
    torch.manual_seed(1)
    conv = nn.Conv1d(2, 3, 5, stride=2, padding=2)
    true = explicit_singular_values(conv_without_bias(conv), (2, 11))[0]
    assert true <= linear_operator_norm(conv, (2, 11)) <= true * (1 + 1e-4)
    pool = nn.AvgPool2d(3, stride=1, padding=1)  # overlapping average pooling
    true = explicit_singular_values(pool, (1, 6, 6))[0]
    assert true <= linear_operator_norm(pool, (1, 6, 6)) <= true * (1 + 1e-4)
    assert lipschitz_upper_bound(nn.AvgPool2d(2), (2, 6, 6)) == pytest.approx(0.5, rel=1e-4)  # 1 / k


def test_torch_spectral_norm_does_not_bound_conv_and_state_is_untouched():
    size = 8
    conv = nn.Conv2d(1, 1, 3, stride=1, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    conv = spectral_norm(conv)
    with torch.no_grad():  # converge torch's power iteration (rank one: immediate)
        for _ in range(5):
            conv(torch.randn(1, 1, size, size, dtype=torch.float64))
        conv.eval()
        kernel_norm = torch.linalg.matrix_norm(conv.weight.reshape(1, -1), ord=2).item()
        conv.train()
    assert kernel_norm == pytest.approx(1.0, rel=1e-9)  # torch's "spectral norm" is 1 ...
    # ... but the conv is (1/3) T (x) T, T the 8x8 tridiagonal of ones, whose top eigenvalue is 1 + 2 cos(pi/9):
    closed_form = (1 + 2 * math.cos(math.pi / (size + 1))) ** 2 / 3  # 2.76
    true = explicit_singular_values(lambda x: conv(x), (1, size, size))[0]
    assert true == pytest.approx(closed_form, rel=1e-10)
    before = sn_state(conv)
    value = linear_operator_norm(conv, (1, size, size))
    assert value == pytest.approx(closed_form, rel=1e-4) and value >= closed_form > 2.7
    net = nn.Sequential(conv, nn.Flatten(), nn.LeakyReLU(0.2))
    assert lipschitz_upper_bound(net, (1, size, size)) == pytest.approx(value, rel=1e-9)
    for old, new in zip(before, sn_state(conv)):
        assert torch.equal(old, new)  # u, v and the raw weight unchanged
    assert conv.training and net.training and conv.parametrizations.weight[0].training  # modes restored


CRITICS = [  # (data_shape, width, spectral_norm)
    ((2,), 16, False),
    ((2,), 16, True),
    ((5,), 8, True),
    ((1, 8, 8), 4, False),
    ((1, 8, 8), 64, True),
    ((2, 16, 16), 4, True),
]


@pytest.mark.parametrize("activation", ["leaky_relu", "maxmin"])
@pytest.mark.parametrize("shape, width, sn", CRITICS)
def test_network_bound_dominates_gradients_and_pair_ratios(shape, width, sn, activation):
    torch.manual_seed(len(shape) + width)
    critic = build_critic(shape, width=width, spectral_norm=sn, activation=activation).double()
    with torch.no_grad():  # a few training-mode forwards move the spectral-norm estimates
        for _ in range(3):
            critic(torch.randn(4, *shape, dtype=torch.float64))
    critic.eval()
    bound = lipschitz_upper_bound(critic, shape)
    x = torch.randn(256, *shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x)  # row i = grad h(x_i): no batch coupling
    grad_norms = grad.flatten(1).norm(dim=1)
    x = x.detach()
    near = x + 1e-4 * torch.randn_like(x)
    far = torch.randn_like(x)
    with torch.no_grad():
        ratios = torch.stack([empirical_lipschitz(critic, x, near), empirical_lipschitz(critic, x, far)])
    assert grad_norms.max() <= bound
    assert ratios.max() <= bound
    assert grad_norms.max() > 1e-3 * bound  # the comparison is not vacuous


def test_maxmin_is_one_lipschitz_and_keeps_gradient_norms():
    """Sorting pairs is a permutation of the input on each region, so |MaxMin(x) - MaxMin(y)| <=
    |x - y| (checked on random pairs) and the vector-Jacobian product keeps the norm."""
    torch.manual_seed(4)
    act = MaxMin()
    x, y = torch.randn(2, 512, 6, dtype=torch.float64)
    assert (act(x) - act(y)).norm(dim=1).div((x - y).norm(dim=1)).max() <= 1 + 1e-12
    assert torch.equal(act(torch.tensor([[3.0, -1.0, 1.0, 2.0]])), torch.tensor([[3.0, 2.0, 1.0, -1.0]]))
    x.requires_grad_(True)
    cotangent = torch.randn(512, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(act(x), x, cotangent)
    assert torch.allclose(grad.norm(dim=1), cotangent.norm(dim=1))
    images = torch.randn(2, 4, 3, 3)  # pairs along the channel dimension for conv critics
    assert torch.equal(act(images)[:, :2], torch.maximum(images[:, :2], images[:, 2:]))
    with pytest.raises(ValueError, match="even"):
        act(torch.randn(2, 5))


def test_single_linear_bound_is_tight():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 1), Squeeze()).double()
    w = net[0].weight.detach()[0]  # (5,)
    bound = lipschitz_upper_bound(net, (5,))
    assert bound == pytest.approx(w.norm().item(), rel=1e-12)
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        assert empirical_lipschitz(net, x, x + 0.7 * w).item() == pytest.approx(bound, rel=1e-12)


def test_converged_spectral_norm_mlp_critic_is_one_lipschitz():
    torch.manual_seed(3)
    critic = build_critic((2,), spectral_norm=True)
    with torch.no_grad():
        for _ in range(500):  # torch's power iteration: one step per training forward
            critic(torch.randn(8, 2))
    bound = lipschitz_upper_bound(critic, (2,))
    assert 1 - 1e-6 <= bound <= 1 + 1e-3


def test_unsupported_modules_raise():
    with pytest.raises(ValueError, match=r"'1'.*BatchNorm1d.*normalisation"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()), (3,))
    with pytest.raises(ValueError, match="LayerNorm"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), (3,))
    dropout_net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="Dropout"):
        lipschitz_upper_bound(dropout_net, (3,))  # training mode: random 1 / (1 - p) rescaling
    dropout_net.eval()
    assert lipschitz_upper_bound(dropout_net, (3,)) == pytest.approx(linear_operator_norm(dropout_net[0], (3,)))


@pytest.mark.parametrize("layer, shape", [(nn.Linear(3, 4), (3,)), (nn.Conv2d(1, 2, 3, padding=1), (1, 5, 5))])
def test_non_finite_weights_are_named(layer, shape):
    """A layer with a NaN weight has no operator norm: a ValueError naming it, not eigh's or svd's failure."""
    with torch.no_grad():
        layer.weight[0].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights"):
        lipschitz_upper_bound(nn.Sequential(layer, nn.ReLU()), shape)


@pytest.mark.parametrize(
    "activation, constant",
    [
        (nn.LeakyReLU(0.2), 1.0),
        (nn.LeakyReLU(2.0), 2.0),
        (nn.LeakyReLU(-3.0), 3.0),
        (nn.Sigmoid(), 0.25),
        (nn.ELU(alpha=0.5), 1.0),
        (nn.ELU(alpha=2.0), 2.0),
        (nn.Tanh(), 1.0),
    ],
)
def test_activation_constants(activation, constant):
    linear = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
    net = nn.Sequential(linear, activation, nn.Identity())
    assert lipschitz_upper_bound(net, (3,)) == pytest.approx(constant, rel=1e-12)
    if isinstance(activation, nn.LeakyReLU):  # |slope| is attained on the negative half-line
        x = -torch.rand(100, 3, dtype=torch.float64) - 0.1
        y = x.clone()
        y[:, 0] -= 0.05
        ratio = empirical_lipschitz(lambda v: net(v)[:, 0], x, y).item()
        assert ratio == pytest.approx(abs(activation.negative_slope), rel=1e-9)


def test_max_pool_constant_is_attained():
    overlapping = nn.Sequential(nn.MaxPool2d(3, stride=1))
    assert lipschitz_upper_bound(overlapping, (1, 7, 7)) == pytest.approx(3.0)  # sqrt(9 windows)
    x = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    x[0, 0, 3, 3] = 1.0  # in 9 windows: 9 outputs move by 1, ratio sqrt(9)
    assert (overlapping(x) - overlapping(torch.zeros_like(x))).norm().item() == pytest.approx(3.0)
    assert lipschitz_upper_bound(nn.Sequential(nn.MaxPool2d(2)), (1, 6, 6)) == 1.0


def test_top_eigenvalue_restarts_and_warns():
    diag = torch.linspace(0.1, 2.0, 300, dtype=torch.float64)
    theta, converged = _top_eigenvalue(lambda v: diag * v, torch.ones(300, dtype=torch.float64), 1e-10, 2000, basis=6)
    assert converged and theta == pytest.approx(2.0, rel=1e-8)  # several restarts of a 6-vector basis
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.warns(RuntimeWarning, match="no convergence"):
        linear_operator_norm(conv, (2, 8, 8), max_iter=2)


def test_empirical_lipschitz_matches_loop():
    torch.manual_seed(4)
    net = build_critic((1, 8, 8), width=4).double().eval()
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    y = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    y[5] = x[5]  # zero distance: skipped
    with torch.no_grad():
        value = empirical_lipschitz(net, x, y)
        hx, hy = net(x), net(y)
    loop = max(
        abs(hx[i] - hy[i]).item() / (x[i] - y[i]).flatten().norm().item() for i in range(20) if i != 5
    )
    assert value.item() == pytest.approx(loop, rel=1e-12)
    assert empirical_lipschitz(net, x, x).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        empirical_lipschitz(net, x, y[:3])
