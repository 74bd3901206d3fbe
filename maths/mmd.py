"""The maximum mean discrepancy of WAE-MMD (docs/theory.md 3.3; Tolstikhin et al. 2018).

    MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y),   x, x' ~ P,  y, y' ~ Q,

estimated without bias by the U-statistic (diagonal terms left out), with the inverse
multiquadratic kernel C / (C + ||x - y||^2) or the RBF kernel exp(-||x - y||^2 / C), each summed
over the WAE paper's scales C_s = s * C, C = 2 d_z sigma^2 (sigma^2 the prior's variance).
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
from torch import Tensor

from maths.choices import check_choice
from maths.precision import autocast_off, promoted
from transport.costs import pairwise_cost

KernelName = Literal["imq", "rbf"]
KERNEL_NAMES: tuple[str, ...] = get_args(KernelName)
# Multiples of the base scale C = 2 d_z sigma^2 summed over in the WAE paper's MMD.
DEFAULT_KERNEL_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def check_kernel_name(name: str) -> None:
    """Raise ValueError listing the kernel names if `name` is not one."""
    check_choice("kernel", name, KERNEL_NAMES)


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
    d2 = pairwise_cost(x, y, "l2sq")  # (N, M)
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
    """Unbiased U-statistic estimate of MMD^2(P, Q) from x ~ P (n, d) and y ~ Q (m, d).

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
    x, y = promoted(x), promoted(y)
    with autocast_off(x.device):  # the Gram matrices in float32 under mixed precision
        k_xx = kernel_matrix(x, x, kernel, scales, base_scale)  # (n, n)
        k_yy = kernel_matrix(y, y, kernel, scales, base_scale)  # (m, m)
        k_xy = kernel_matrix(x, y, kernel, scales, base_scale)  # (n, m)
    off_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    off_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off_xx + off_yy - 2.0 * k_xy.mean()
