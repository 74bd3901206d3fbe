"""Ground costs on flattened samples: the one cost registry of the project (docs/theory.md section 1).

    l2   = ||x - y||_2     (a metric: the setting of the primal-dual theorem)
    l2sq = ||x - y||_2^2   (the WAE default)
    l1   = ||x - y||_1

Samples of any shape are flattened to vectors, so an image's cost is the cost of its pixel vector,
summed over pixels. `cost` pairs samples one to one (a reconstruction cost), `pairwise_cost` builds
the matrix C_ij = c(x_i, y_j) that transport problems and kernels use. Both are differentiable and
keep the inputs' dtype; the transport solvers call them on float64 copies from `flatten_samples`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from maths.choices import check_choice

CostName = Literal["l2", "l2sq", "l1"]
COST_NAMES: tuple[str, ...] = get_args(CostName)
METRIC_COSTS: tuple[str, ...] = ("l2", "l1")  # costs that are metrics (an l2-Lipschitz critic is l1-Lipschitz)


def check_cost_name(name: str) -> None:
    """Raise ValueError listing the cost names if `name` is not one."""
    check_choice("cost", name, COST_NAMES)


def cost(x: Tensor, y: Tensor, name: str = "l2sq") -> Tensor:
    """Per-sample cost c(x_i, y_i) on flattened samples. x, y: (B, ...) -> (B,)."""
    check_cost_name(name)
    if x.shape != y.shape:
        raise ValueError(f"cost needs samples of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    diff = (x - y).flatten(start_dim=1)  # (B, D)
    if name == "l2sq":
        return diff.pow(2).sum(dim=1)
    if name == "l2":
        return torch.linalg.vector_norm(diff, dim=1)
    return diff.abs().sum(dim=1)


def pairwise_cost(
    x: Tensor, y: Tensor, name: str = "l2sq", y_sqnorm: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """C_ij = c(x_i, y_j) between flattened rows. x: (n, ...), y: (m, ...) -> (n, m), in x's dtype.

    l2sq expands the square, ||x||^2 + ||y||^2 - 2 <x, y>, clamped at 0 (exact enough in float64,
    and the fast form for kernels); l2 is its square root; l1 sums absolute differences.
    `y_sqnorm` (m,) reuses the rows' squared norms of y across calls; `out` (n, m) receives the
    result in place (no allocation: the chunked transport solver refills one buffer; not
    differentiable). Without `out` the result is differentiable (l2: except where x_i = y_j).
    """
    check_cost_name(name)
    if x.shape[1:].numel() != y.shape[1:].numel():
        raise ValueError(f"pairwise_cost needs samples of equal size, got {tuple(x.shape)} and {tuple(y.shape)}.")
    x, y = x.flatten(start_dim=1), y.flatten(start_dim=1)  # (n, D), (m, D)
    if name == "l1":
        c = torch.cdist(x, y, p=1.0)
        return out.copy_(c) if out is not None else c
    y_sqnorm = y.pow(2).sum(1) if y_sqnorm is None else y_sqnorm  # (m,)
    if out is None:  # out of place: differentiable
        d2 = (x.pow(2).sum(1, keepdim=True) + y_sqnorm[None, :] - 2.0 * x @ y.T).clamp_min(0.0)
        return d2.sqrt() if name == "l2" else d2
    torch.addmm(y_sqnorm[None, :], x, y.T, alpha=-2.0, out=out)
    out.add_(x.pow(2).sum(1, keepdim=True)).clamp_min_(0.0)
    return out.sqrt_() if name == "l2" else out


def flatten_samples(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Validate two sample sets and return them as float64 (n, D), (m, D) on x's device.

    x: (n, ...) and y: (m, ...) with the same number of features per sample; 1-D inputs are n
    scalar samples. Certified numbers are computed from these copies, whatever the inputs' dtype.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}.")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"x and y must have a sample dimension, got shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"x and y must hold at least one sample each, got shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    x2 = x.reshape(x.shape[0], -1)
    y2 = y.reshape(y.shape[0], -1)
    if x2.shape[1] != y2.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features per sample: x has shape {tuple(x.shape)} "
            f"({x2.shape[1]} features), y has shape {tuple(y.shape)} ({y2.shape[1]} features)."
        )
    if x2.shape[1] == 0:
        raise ValueError(f"samples have no features: shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    x2 = x2.detach().to(torch.float64).contiguous()
    y2 = y2.detach().to(device=x.device, dtype=torch.float64).contiguous()
    if not (torch.isfinite(x2).all() and torch.isfinite(y2).all()):
        raise ValueError("x and y must be finite (found NaN or inf).")
    return x2, y2
