"""Entropic optimal transport as a training loss, through geomloss (docs/theory.md 3.5 and 5.2).

Between the uniform empirical measures a of x_1..x_n and b of y_1..y_m, with C_ij = c(x_i, y_j):

    OT_eps(a, b) = min_{pi in Pi(a, b)} <pi, C> + eps KL(pi || a x b)   >= W_c(a, b),
    S_eps(a, b)  = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2    (debiased; NOT a bound).

`transport_loss` computes either with geomloss's legacy `SamplesLoss("sinkhorn", backend=
"tensorized")`, differentiable in both sample sets. geomloss's own conventions are hidden behind
the project's cost names: with p = 2 it uses |x - y|^2 / 2 at temperature blur^2, and
OT_eps(C) = 2 OT_{eps/2}(C / 2), so `l2sq` (|x - y|^2 in full) is twice its p = 2 value at the same
blur, at eps = 2 blur^2; with p = 1 its cost is |x - y| at eps = blur, which is `l2` as is.
`blur_to_eps` is that conversion, shared with the certified bracket (`transport.bracket`).

geomloss returns the dual value of its last potentials: OT_eps once its eps-scaling schedule has
converged (scaling -> 1), slightly below before that, and its gradient is the envelope-theorem
gradient of that solve. The training value is therefore an estimate of OT_eps; certified
statements come from `transport.bracket`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from maths.choices import check_choice
from maths.precision import autocast_off, promoted
from transport.costs import check_cost_name

EntropicCost = Literal["l2sq", "l2"]
ENTROPIC_COSTS: tuple[str, ...] = get_args(EntropicCost)  # the costs geomloss's p = 2 and p = 1 give exactly
Objective = Literal["entropic", "sinkhorn_divergence"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def blur_to_eps(blur: float, cost: str) -> float:
    """The temperature eps of a blur radius (in data units): 2 blur^2 for l2sq, blur for l2 and l1."""
    check_cost_name(cost)
    if not blur > 0:
        raise ValueError(f"blur must be a positive number (a distance in data units), got {blur}.")
    return 2.0 * blur**2 if cost == "l2sq" else float(blur)


def transport_loss(
    x: Tensor,
    y: Tensor,
    cost: str = "l2",
    blur: float = 0.05,
    objective: str = "entropic",
    scaling: float = 0.5,
) -> Tensor:
    """OT_eps(x, y) (objective="entropic", debias off: >= W_c(x, y)) or the Sinkhorn divergence
    S_eps(x, y) (objective="sinkhorn_divergence": debiased, not a bound) between the uniform
    empirical measures of x (n, ...) and y (m, ...), flattened to vectors.

    cost "l2sq" = |x - y|^2 (eps = 2 blur^2) or "l2" = |x - y| (eps = blur); `scaling` is geomloss's
    ratio between successive blur radii, in (0, 1). Differentiable in x and y; a scalar tensor in
    float32 for bfloat16 or float16 inputs (computed outside autocast).
    """
    from geomloss import SamplesLoss

    check_choice("cost", cost, ENTROPIC_COSTS)
    check_choice("objective", objective, OBJECTIVES)
    blur_to_eps(blur, cost)
    if not 0 < scaling < 1:
        raise ValueError(f"scaling is the ratio between successive blur radii, in (0, 1), got {scaling}.")
    if x.ndim < 2 or y.ndim < 2 or x.shape[1:].numel() != y.shape[1:].numel() or not len(x) or not len(y):
        raise ValueError(
            f"transport_loss needs two non-empty sample sets (n, ...) and (m, ...) with the same number of "
            f"features per sample, got shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    x2, y2 = promoted(x.flatten(start_dim=1)), promoted(y.flatten(start_dim=1))  # (n, D), (m, D)
    p = 2 if cost == "l2sq" else 1
    loss = SamplesLoss(
        "sinkhorn", p=p, blur=blur, debias=objective == "sinkhorn_divergence", scaling=scaling, backend="tensorized"
    )
    grad_mode = torch.is_grad_enabled()
    try:  # geomloss 0.3.1 ends with set_grad_enabled(True), also under torch.no_grad(): restore the mode
        with autocast_off(x2.device):  # the cost matrix and the Sinkhorn iterations in float32
            value = loss(x2.contiguous(), y2.contiguous())  # |x-y|^2 / 2 at eps = blur^2 (p=2), |x-y| at blur (p=1)
    finally:
        torch.set_grad_enabled(grad_mode)
    return 2.0 * value if cost == "l2sq" else value
