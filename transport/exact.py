"""Exact optimal transport through POT, and when to prefer it to the Sinkhorn bracket
(docs/theory.md 5.6).

`exact_wasserstein` solves the linear program of docs/theory.md 5.1 by POT's network simplex
`ot.emd2` (Flamary et al., JMLR 2021; optional dependency): the exact value, both ends of a
bracket of width 0.

`prefer_exact` decides `exact="auto"`: it predicts both solvers' times on this problem and picks the
smaller. The models are power laws in the number of cost entries N = n m,

    t_exact(N, D)    = A_e(D) N^p_e(D)           t_bracket(N, D) = A_s(D) N^p_s(D),

with (log A, p) interpolated linearly in log D between the dimensions of the fit and held
constant outside them. The constants are least-squares fits of log time on log N to timings of
emd2 and of the bracket (exact=False, tol 1%) on the Gaussian clouds of `benchmarks.transport`,
n = 256 to 2048 (where the two cross), on one CPU core; only the ratio of the two predictions
matters, so the choice does not depend on the machine's speed. The benchmark prints the same fit
from its own grid (`benchmarks.transport_report.fit_cost_model`): refit whenever either solver
changes.
The bracket's time depends on tol and the data beyond (N, D); the model is a prediction, and a
wrong one only costs time: either answer is certified. POT also needs 16 N bytes (the float64
cost matrix and plan) within the memory budget, and runs on the CPU.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
from torch import Tensor

from transport.costs import check_cost_name, flatten_samples, pairwise_cost

# (D, log A_e, p_e, log A_s, p_s) at the dimensions of the fit (see the module docstring).
COST_MODEL: tuple[tuple[float, float, float, float, float], ...] = (
    (2.0, -17.60, 1.126, -10.70, 0.594),
    (64.0, -18.82, 1.234, -14.46, 0.816),
    (784.0, -18.96, 1.256, -14.30, 0.838),
)


def pot_installed() -> bool:
    return importlib.util.find_spec("ot") is not None


def predicted_seconds(n: int, m: int, dim: int) -> tuple[float, float]:
    """(exact, bracket) predicted seconds of the cost model (module docstring)."""
    log_d = math.log(max(dim, 1))
    dims = [math.log(row[0]) for row in COST_MODEL]
    if log_d <= dims[0]:
        params = COST_MODEL[0][1:]
    elif log_d >= dims[-1]:
        params = COST_MODEL[-1][1:]
    else:
        k = next(i for i in range(1, len(dims)) if log_d <= dims[i])
        w = (log_d - dims[k - 1]) / (dims[k] - dims[k - 1])
        params = tuple((1 - w) * lo + w * hi for lo, hi in zip(COST_MODEL[k - 1][1:], COST_MODEL[k][1:]))
    log_n = math.log(n * m)
    log_ae, p_e, log_as, p_s = params
    return math.exp(log_ae + p_e * log_n), math.exp(log_as + p_s * log_n)


def prefer_exact(n: int, m: int, dim: int, device: torch.device, budget: int) -> bool:
    """exact="auto": POT installed, its 16 n m bytes within `budget`, and predicted faster."""
    if not pot_installed() or 16 * n * m > budget:
        return False
    exact, bracket = predicted_seconds(n, m, dim)
    if device.type != "cpu":  # the bracket runs on the device, POT on the CPU after a copy
        return n * m <= 2**16
    return exact < bracket


def exact_wasserstein(x: Tensor, y: Tensor, cost: str = "l2sq") -> float:
    """Exact W_c between the empirical measures of x (n, ...) and y (m, ...) by POT's network
    simplex `ot.emd2` (uniform weights; cost as in `transport.costs`). Its time grows about as
    (n m)^1.1 to (n m)^1.25 (docs/BENCHMARKS.md); memory 16 n m bytes. Needs POT (optional)."""
    check_cost_name(cost)
    try:
        import ot
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "exact_wasserstein needs POT (Python Optimal Transport), an optional dependency: "
            'pip install POT, or pip install -e ".[test]" in this repository.'
        ) from err
    x2, y2 = flatten_samples(x, y)
    n, m = x2.shape[0], y2.shape[0]
    C = pairwise_cost(x2.cpu(), y2.cpu(), cost, out=torch.empty(n, m, dtype=torch.float64)).numpy()
    value, log = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), C, numItermax=max(100_000, 50 * n * m), log=True)
    if log.get("warning"):
        raise RuntimeError(f"POT's ot.emd2 did not reach the optimum: {log['warning']}")
    return float(value)
