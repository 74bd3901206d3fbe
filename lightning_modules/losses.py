"""Costs, MMD kernels and latent priors: pure functions shared by every model (SPEC sections 2, 4).

Costs act on flattened samples and are summed over coordinates (pixels), so an image's cost is
the cost of its vector; the models average them over the batch.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence, get_args

import torch
from torch import Tensor

CostName = Literal["l2", "l2sq", "l1"]
KernelName = Literal["imq", "rbf"]
PriorName = Literal["gaussian", "sphere", "cube"]
COST_NAMES: tuple[str, ...] = get_args(CostName)
KERNEL_NAMES: tuple[str, ...] = get_args(KernelName)
PRIOR_NAMES: tuple[str, ...] = get_args(PriorName)

# Multiples of the base scale C = 2 d_z sigma^2 summed over in the WAE paper's MMD (Tolstikhin et al. 2018).
DEFAULT_KERNEL_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def check_choice(kind: str, name: str, known: Sequence[str]) -> None:
    """Raise ValueError naming the valid choices if `name` is not one of `known`."""
    if name not in known:
        raise ValueError(f"Unknown {kind} {name!r}. Valid choices: {', '.join(known)}.")


def check_cost_name(name: str) -> None:
    """Raise ValueError listing the cost names if `name` is not one."""
    check_choice("cost", name, COST_NAMES)


def check_prior_name(name: str) -> None:
    """Raise ValueError listing the prior names if `name` is not one."""
    check_choice("prior", name, PRIOR_NAMES)


def check_kernel_name(name: str) -> None:
    """Raise ValueError listing the kernel names if `name` is not one."""
    check_choice("kernel", name, KERNEL_NAMES)


def cost(x: Tensor, y: Tensor, name: str = "l2sq") -> Tensor:
    """Per-sample cost c(x_i, y_i) on flattened samples. x, y: (B, ...) -> (B,).

    l2 = ||x - y||_2 (a metric), l2sq = ||x - y||_2^2, l1 = ||x - y||_1.
    """
    check_cost_name(name)
    if x.shape != y.shape:
        raise ValueError(f"cost needs samples of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    diff = (x - y).flatten(start_dim=1)  # (B, D)
    if name == "l2sq":
        return diff.pow(2).sum(dim=1)
    if name == "l2":
        return torch.linalg.vector_norm(diff, dim=1)
    return diff.abs().sum(dim=1)


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_j||^2 for flattened rows. x: (N, ...), y: (M, ...) -> (N, M), clamped at 0."""
    x, y = x.flatten(start_dim=1), y.flatten(start_dim=1)  # (N, D), (M, D)
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.T
    return d2.clamp_min_(0.0)


def pairwise_cost(x: Tensor, y: Tensor, name: str = "l2sq") -> Tensor:
    """Cost matrix C_ij = c(x_i, y_j) between flattened rows. x: (N, ...), y: (M, ...) -> (N, M)."""
    check_cost_name(name)
    if x.shape[1:].numel() != y.shape[1:].numel():
        raise ValueError(
            f"pairwise_cost needs samples of equal size, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if name == "l2sq":
        return squared_distances(x, y)
    p = 2.0 if name == "l2" else 1.0
    return torch.cdist(x.flatten(start_dim=1), y.flatten(start_dim=1), p=p)


def kernel_matrix(
    x: Tensor,
    y: Tensor,
    kernel: str = "imq",
    scales: Sequence[float] = DEFAULT_KERNEL_SCALES,
    base_scale: float = 1.0,
) -> Tensor:
    """Sum over scales s of a kernel with bandwidth C_s = s * base_scale. (N, d), (M, d) -> (N, M).

    imq: C_s / (C_s + ||x - y||^2) (inverse multiquadratic, WAE paper); rbf: exp(-||x - y||^2 / C_s).
    """
    check_kernel_name(kernel)
    d2 = squared_distances(x, y)  # (N, M)
    total = torch.zeros_like(d2)
    for s in scales:
        c = s * base_scale
        total = total + (c / (c + d2) if kernel == "imq" else torch.exp(-d2 / c))
    return total


def mmd_unbiased(
    x: Tensor,
    y: Tensor,
    kernel: str = "imq",
    scales: Sequence[float] = DEFAULT_KERNEL_SCALES,
    base_scale: float | None = None,
) -> Tensor:
    """Unbiased U-statistic estimate of MMD^2(P, Q) from x ~ P (n, d) and y ~ Q (m, d) (SPEC 4).

    MMD^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
            - 2/(nm) sum_{i,j} k(x_i, y_j).
    base_scale None uses C = 2 d (the WAE paper's 2 d_z sigma^2 for a unit-variance prior).
    The estimate can be negative.
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_unbiased needs at least 2 samples on each side, got {n} and {m}.")
    if base_scale is None:
        base_scale = 2.0 * x.shape[1]
    k_xx = kernel_matrix(x, x, kernel, scales, base_scale)  # (n, n)
    k_yy = kernel_matrix(y, y, kernel, scales, base_scale)  # (m, m)
    k_xy = kernel_matrix(x, y, kernel, scales, base_scale)  # (n, m)
    off_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    off_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off_xx + off_yy - 2.0 * k_xy.mean()


def sample_prior(
    name: str,
    num_samples: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw (num_samples, dim) latent codes: gaussian N(0, I), sphere (uniform on the unit sphere
    S^{dim-1}) or cube (uniform on [-1, 1]^dim)."""
    check_prior_name(name)
    shape = (num_samples, dim)
    if name == "cube":
        return 2.0 * torch.rand(shape, generator=generator, device=device, dtype=dtype) - 1.0
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if name == "sphere":
        z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z


def prior_variance(name: str, dim: int) -> float:
    """Per-coordinate variance of the prior: 1 (gaussian), 1/dim (sphere), 1/3 (cube)."""
    check_prior_name(name)
    return {"gaussian": 1.0, "sphere": 1.0 / dim, "cube": 1.0 / 3.0}[name]



def gradient_penalty(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """WGAN-GP penalty E[(||grad_x h(x_hat)||_2 - 1)^2] at random interpolates
    x_hat = t x + (1 - t) y, t ~ U[0, 1] per sample (Gulrajani et al. 2017).

    critic: (B, ...) -> (B,); real, fake: (B, ...). Returns (penalty, mean gradient norm), the
    penalty differentiable with respect to the critic's parameters.
    """
    t_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    t = torch.rand(t_shape, generator=generator, dtype=real.dtype).to(real.device)  # (B, 1, ...)
    x_hat = (t * real.detach() + (1.0 - t) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norms = torch.linalg.vector_norm(grad.flatten(start_dim=1), dim=1)  # (B,)
    return (norms - 1.0).pow(2).mean(), norms.detach().mean()
