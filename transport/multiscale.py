"""A coarse-to-fine start for the bracket's Sinkhorn in low dimension (docs/theory.md 5.6).

In low dimension the bracket needs eps far below the largest cost (a plan close to a map), where
plain eps-scaling spends many passes over the full n x m problem. Instead (`transport.solver`):

1. `coarsen`: cluster each cloud (Lloyd's k-means, k = COARSE_FRACTION of the points): centres
   x'_I with weights a'_I (the clusters' shares of the points), y'_J with b'_J; q = the larger mean
   cost of a point to its centre, the scale below which the coarse problem says nothing about
   the fine one.
2. The solver solves the coarse problem (weights a', b', cost C'_IJ = c(x'_I, y'_J)) with the same
   bracket, recursively, to the same tol: potentials F on x', a final temperature eps'.
3. `lift`: g_j = -eps log sum_I a'_I exp((F_I - c(x'_I, y_j)) / eps) at eps = max(eps', q), the
   smoothed c-transform of F at the fine points (the g-update the coarse potentials imply
   there); the fine solve starts at eps from g (its first update computes f).

Only the start changes: the fine iterations and every certificate run on the full problem, so the
bounds stay certified whatever the clustering. Used when the dimension is at most
MULTISCALE_MAX_DIM and both clouds have at least MULTISCALE_MIN_POINTS points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transport.matrix import CostMatrix
from transport.sinkhorn import _logsumexp_

MULTISCALE_MAX_DIM = 3
MULTISCALE_MIN_POINTS = 512
COARSE_FRACTION = 1 / 4  # clusters per point
COARSE_MIN, COARSE_MAX = 64, 8192  # clusters per cloud
LLOYD_STEPS = 4


def use_multiscale(n: int, m: int, dim: int) -> bool:
    """Whether the coarse-to-fine start is used by default (module docstring)."""
    return dim <= MULTISCALE_MAX_DIM and min(n, m) >= MULTISCALE_MIN_POINTS


def kmeans(x: Tensor, k: int, steps: int = LLOYD_STEPS, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd's k-means on x (n, D) from k distinct points drawn with `seed`, on x's device, with
    distances in float32 by blocks of points (a heuristic: any clustering keeps the bounds valid).
    Returns (centres (k', D) in x's dtype, weights (k',) summing to 1, assignment (n,) into the
    k' <= k non-empty clusters)."""
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    x32 = x.float()
    assign = torch.empty(n, dtype=torch.long, device=x.device)
    for step in range(steps + 1):
        blocks = CostMatrix(x32, centres.float(), "l2sq", "chunked")
        for rows, c in blocks.blocks():
            assign[rows] = c.argmin(1)
        counts = torch.bincount(assign, minlength=centres.shape[0])
        if step == steps:
            break
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    filled = counts > 0
    remap = torch.cumsum(filled, 0) - 1
    return centres[filled], counts[filled].to(x.dtype) / n, remap[assign]


def _quantisation(x: Tensor, centres: Tensor, assign: Tensor, cost: str) -> float:
    """Mean cost of a point to its centre."""
    diff = x - centres[assign]
    if cost == "l2sq":
        return diff.pow(2).sum(1).mean().item()
    if cost == "l2":
        return diff.norm(dim=1).mean().item()
    return diff.abs().sum(1).mean().item()


def coarsen(x: Tensor, y: Tensor, cost: str) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Cluster both clouds (module docstring, step 1): (x' (k, D), a' (k,), y' (l, D), b' (l,), q)."""
    k = max(COARSE_MIN, min(COARSE_MAX, int(COARSE_FRACTION * min(x.shape[0], y.shape[0]))))
    cx, ax, assign_x = kmeans(x, k, seed=0)
    cy, by, assign_y = kmeans(y, k, seed=1)
    q = max(_quantisation(x, cx, assign_x, cost), _quantisation(y, cy, assign_y, cost))
    return cx, ax, cy, by, q


def lift(centres: Tensor, weights: Tensor, potential: Tensor, y: Tensor, cost: str, eps: float) -> Tensor:
    """g_j = -eps log sum_I a'_I exp((F_I - c(x'_I, y_j)) / eps) at the fine points y (m,), by
    blocks of fine points (module docstring, step 3)."""
    blocks = CostMatrix(y, centres, cost, "chunked")
    scaled = potential / eps + weights.log()
    g = torch.empty(y.shape[0], dtype=y.dtype, device=y.device)
    for rows, c in blocks.blocks():
        buf = blocks.scratch(rows)
        torch.sub(scaled[None, :], c, alpha=1.0 / eps, out=buf)
        g[rows] = -eps * _logsumexp_(buf, 1)
    return g
