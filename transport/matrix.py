"""Cost matrices held in memory or recomputed block by block (docs/theory.md section 5.6).

Every pass of the transport solvers walks the row blocks of C_ij = c(x_i, y_j) (float64, from
`transport.costs.pairwise_cost`): views of the matrix built once and kept ("tensorized": memory
n m float64, plus one block of scratch), or blocks of rows recomputed from x and y on each pass
("chunked": memory O(block_rows * m), and each pass recomputes C, a matrix product with D
columns). Both are plain torch on the samples' device; pykeops (which geomloss's `online` backend
needs) is not installed by this project and not needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from maths.choices import check_choice
from transport.costs import check_cost_name, pairwise_cost

BACKENDS: tuple[str, ...] = ("auto", "tensorized", "chunked")
# "auto" switches to the chunked backend above this many matrix entries (2^25 float64 = 256 MiB).
AUTO_CHUNK_ENTRIES = 2**25
# Entries per block of a pass. On CPU a pass makes several sweeps over each block (shift, exp,
# sums), so blocks of 2^18 float64 (2 MiB) stay in cache and C is streamed from memory once per
# direction. On CUDA, few large blocks (fewer kernel launches).
BLOCK_ENTRIES = {"cpu": 2**18, "cuda": 2**24}
# Rows recomputed at a time by the chunked backend on CUDA (on CPU it uses BLOCK_ENTRIES).
CUDA_CHUNK_ENTRIES = 2**22


class CostMatrix:
    """C given by row blocks: kept in memory (`tensorized`) or recomputed per pass (`chunked`).

    x: (n, D), y: (m, D) float64 from `flatten_samples`. Passes walk blocks of rows: views of
    the matrix held (tensorized), or blocks recomputed into a reused buffer (chunked, `chunk_size`
    rows each; default 2^18 entries per block on CPU, 2^22 on CUDA). A scratch buffer of one
    block's size serves the passes (no large allocation per iteration).
    """

    def __init__(self, x: Tensor, y: Tensor, cost: str, backend: str = "auto", chunk_size: int | None = None) -> None:
        check_cost_name(cost)
        check_choice("backend", backend, BACKENDS)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        self.x, self.y, self.cost = x, y, cost
        self.n, self.m = x.shape[0], y.shape[0]
        if backend == "auto":
            backend = "chunked" if self.n * self.m > AUTO_CHUNK_ENTRIES else "tensorized"
        self.backend = backend
        on_cuda = x.device.type == "cuda"
        if backend == "tensorized":
            entries = BLOCK_ENTRIES["cuda" if on_cuda else "cpu"]
        else:
            entries = CUDA_CHUNK_ENTRIES if on_cuda else BLOCK_ENTRIES["cpu"]
        default_rows = max(1, entries // self.m)
        self.block_rows = min(self.n, chunk_size if backend == "chunked" and chunk_size else default_rows)
        self._y_sqnorm = y.pow(2).sum(1)
        self.full = None  # (n, m) when tensorized
        if backend == "tensorized":
            self.full = pairwise_cost(x, y, cost, self._y_sqnorm, out=x.new_empty(self.n, self.m))
        self._block = None if backend == "tensorized" else torch.empty(self.block_rows, self.m, dtype=x.dtype, device=x.device)
        self._scratch = torch.empty(self.block_rows, self.m, dtype=x.dtype, device=x.device)

    def blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """Yield (rows, C[rows]) covering all rows in order; C[rows] is (len(rows), m). In the
        chunked backend the block is a reused buffer: use it before asking for the next one."""
        for start in range(0, self.n, self.block_rows):
            rows = slice(start, min(start + self.block_rows, self.n))
            if self.full is not None:
                yield rows, self.full[rows]
            else:
                yield rows, pairwise_cost(self.x[rows], self.y, self.cost, self._y_sqnorm, out=self._block[: rows.stop - start])

    def scratch(self, rows: slice) -> Tensor:
        """A reusable (len(rows), m) float64 buffer, overwritten by the next call."""
        return self._scratch[: rows.stop - rows.start]


@dataclass
class CostStats:
    """One pass of summary statistics: max and mean cost, and the c-transform lower bound of the
    zero potential, max(mean_i min_j C_ij, mean_j min_i C_ij) <= W_c (docs/theory.md 5.5)."""

    max: float  # largest C_ij: the scale the eps schedule starts from
    mean: float  # <a x b, C>: the cost of the independent coupling, a certified upper bound
    nearest: float  # the c-transform bound of the zero potential, a certified lower bound


def cost_stats(C: CostMatrix) -> CostStats:
    """`CostStats` of C in one pass."""
    cmax, total = 0.0, 0.0
    row_min = torch.empty(C.n, dtype=torch.float64, device=C.x.device)
    col_min = torch.full((C.m,), math.inf, dtype=torch.float64, device=C.x.device)
    for rows, c in C.blocks():
        cmax = max(cmax, c.max().item())
        total += c.sum().item()
        row_min[rows] = c.amin(1)
        col_min = torch.minimum(col_min, c.amin(0))
    nearest = max(row_min.mean().item(), col_min.mean().item())
    return CostStats(max=cmax, mean=total / (C.n * C.m), nearest=nearest)

