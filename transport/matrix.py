"""Cost matrices held in memory or recomputed block by block, and the memory they may use
(docs/theory.md section 5.6).

Every pass of the transport solvers walks the row blocks of C_ij = c(x_i, y_j) (from
`transport.costs.pairwise_cost`, in the dtype of x and y: float64 for certificates, float32 for
iterations): views of the matrix built once and kept ("tensorized": memory n m entries, plus one
block of scratch), or blocks of rows recomputed from x and y on each pass ("chunked": memory
O(block_rows * m), and each pass recomputes C, a matrix product with D columns). Both are plain
torch on the samples' device; pykeops (which geomloss's `online` backend needs) is not installed
by this project and not needed.

`memory_budget` is how many bytes a solver may hold by default (half the memory available on CPU,
three quarters of the free memory on CUDA) and `choose_layout` what the certified bracket holds within it.
"""

from __future__ import annotations

import math
import os
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
# The default budget: this fraction of the memory available when a solve starts (the rest is left to
# the caller's own tensors and to other processes; a GPU's memory is the process's own).
MEMORY_FRACTION = {"cpu": 0.5, "cuda": 0.75}
# Entries per block of the certified bracket's passes (`transport.solver.Problem`). On CPU several
# sweeps per block run from cache; on CUDA, few large blocks (fewer kernel launches).
SOLVER_BLOCK_ENTRIES = {"cpu": 2**18, "cuda": 2**26}


class CostMatrix:
    """C given by row blocks: kept in memory (`tensorized`) or recomputed per pass (`chunked`).

    x: (n, D), y: (m, D) from `flatten_samples` (float64), or float32 copies for iterations: C has
    their dtype. Passes walk blocks of rows: views of
    the matrix held (tensorized), or blocks recomputed into a reused buffer (chunked, `chunk_size`
    rows each; default 2^18 entries per block on CPU, 2^22 on CUDA). A scratch buffer of one
    block's size serves the passes (no large allocation per iteration). `block_entries` overrides
    the entries per block of both backends.
    """

    def __init__(
        self, x: Tensor, y: Tensor, cost: str, backend: str = "auto", chunk_size: int | None = None,
        block_entries: int | None = None,
    ) -> None:
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
        entries = block_entries or entries
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
        """A reusable (len(rows), m) buffer in C's dtype, overwritten by the next call."""
        return self._scratch[: rows.stop - rows.start]


@dataclass
class CostStats:
    """One pass of summary statistics: max and mean cost, and the c-transform lower bound of the
    zero potential, max(sum_i a_i min_j C_ij, sum_j b_j min_i C_ij) <= W_c (docs/theory.md 5.5)."""

    max: float  # largest C_ij: the scale the eps schedule starts from
    mean: float  # <a x b, C>: the cost of the independent coupling, a certified upper bound
    nearest: float  # the c-transform bound of the zero potential, a certified lower bound


def cost_stats(C: CostMatrix, a: Tensor | None = None, b: Tensor | None = None) -> CostStats:
    """`CostStats` of C in one pass, for weights a (n,), b (m,) (default uniform)."""
    a = torch.full((C.n,), 1.0 / C.n, dtype=C.x.dtype, device=C.x.device) if a is None else a
    b = torch.full((C.m,), 1.0 / C.m, dtype=C.x.dtype, device=C.x.device) if b is None else b
    cmax = torch.full((), -math.inf, dtype=C.x.dtype, device=C.x.device)
    total = torch.zeros((), dtype=C.x.dtype, device=C.x.device)
    row_min = torch.empty(C.n, dtype=C.x.dtype, device=C.x.device)
    col_min = torch.full((C.m,), math.inf, dtype=C.x.dtype, device=C.x.device)
    for rows, c in C.blocks():
        cmax = torch.maximum(cmax, c.amax())
        total += torch.dot(a[rows], c @ b)
        row_min[rows] = c.amin(1)
        col_min = torch.minimum(col_min, c.amin(0))
    nearest = max(torch.dot(a, row_min).item(), torch.dot(b, col_min).item())
    return CostStats(max=cmax.item(), mean=total.item(), nearest=nearest)


def memory_budget(device: torch.device) -> int:
    """The default number of bytes a transport solve may hold on `device`: MEMORY_FRACTION of the
    memory available now (CUDA: free device memory; CPU: MemAvailable of /proc/meminfo, else the
    physical memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(MEMORY_FRACTION["cuda"] * free)
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = 2**32
    return int(MEMORY_FRACTION["cpu"] * available)


@dataclass(frozen=True)
class Layout:
    """What the certified bracket holds in memory (docs/theory.md 5.6): the float32 kernel K
    (4 n m bytes: scaling iterations, two matrix-vector products each) and the float64 cost
    matrix (8 n m bytes: certificates and kernel rebuilds without recomputing C)."""

    kernel: bool
    cost64: bool

    def bytes(self, n: int, m: int) -> int:
        return n * m * (4 * self.kernel + 8 * self.cost64)


def choose_layout(n: int, m: int, backend: str, budget: int) -> Layout:
    """"tensorized": both held; "chunked": neither (log-domain float32 passes over blocks of C
    recomputed each pass, memory O((n + m) D)); "auto": both if they fit in `budget` bytes, else the
    kernel alone (C recomputed for certificates and rebuilds), else neither."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        held = backend == "tensorized"
        return Layout(kernel=held, cost64=held)
    for layout in (Layout(True, True), Layout(True, False)):
        if layout.bytes(n, m) <= budget:
            return layout
    return Layout(False, False)
