"""The chain study's 2-D generator, injective by construction, and the checks of injectivity run on
every final generator.

The population f-WAE equals W_c(P_X, P_G) for a deterministic G only when the encoder can invert
it, so the study wants an injective G: a ReLU MLP from N(0, I_2) to the plane can fold (det dG/dz
changes sign), which no encoder undoes. `InjectiveGenerator` cannot fold; `generator_injectivity`
checks the sign of det dG/dz at prior draws (2-D), or the smallest singular value of dG/dz (an
immersion is locally injective) where the latent and data dimensions differ (digits: 8 -> 64).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class InjectiveGenerator(nn.Module):
    """G(z) = b + exp(M) R_K(...R_1(z)), R_k(u) = u + c r_k(u): injective by construction (2-D data).

    r_k is an MLP (d -> width -> width -> d, ReLU) with spectrally normalised linear layers, so
    Lip(r_k) <= ~1, and c = 0.9: R_k is then a bi-Lipschitz bijection of R^d (u = y - c r_k(u) is a
    contraction's fixed point; Behrmann et al. 2019, invertible residual networks), and exp(M) is
    invertible. torch's spectral normalisation uses a power-iteration estimate (from below), so
    `certified_contraction` recomputes max_k c Lip(r_k) from exact operator norms: < 1 certifies
    that this G is injective.
    """

    def __init__(self, dim: int, width: int = 64, blocks: int = 4, contraction: float = 0.9) -> None:
        from lightning_modules.networks import build_mlp

        super().__init__()
        self.contraction = contraction
        self.blocks = nn.ModuleList(
            build_mlp(dim, [width, width], dim, activation="relu", spectral_norm=True) for _ in range(blocks))
        self.log_linear = nn.Parameter(torch.zeros(dim, dim))  # M: exp(M) is always invertible
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dim = dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = z  # (B, d)
        for block in self.blocks:
            u = u + self.contraction * block(u)
        return u @ torch.linalg.matrix_exp(self.log_linear).T + self.bias  # (B, d)

    def certified_contraction(self) -> float:
        """max_k c Lip(r_k) from exact operator norms (eval mode): < 1 means G is injective."""
        from maths.lipschitz import lipschitz_upper_bound

        return max(self.contraction * lipschitz_upper_bound(block, (self.dim,)) for block in self.blocks)


def generator_injectivity(model: Any, num_samples: int) -> dict[str, Any]:
    """2-D -> 2-D: the sign of det dG/dz at `num_samples` prior draws (and, for an
    `InjectiveGenerator`, its certified contraction); otherwise the smallest singular value of dG/dz."""
    from torch.func import jacrev, vmap

    m = copy.deepcopy(model).double().eval()
    z = torch.randn(num_samples, m.latent_dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def decode_one(z1: Any) -> Any:
        return m.decode(z1[None]).flatten()  # (D,)

    with torch.no_grad():
        jac = vmap(jacrev(decode_one))(z)  # (N, D, d_z)
    out: dict[str, Any] = {"generator": type(m.decoder).__name__}
    if isinstance(m.decoder, InjectiveGenerator):
        out["certified_contraction"] = m.decoder.certified_contraction()
    if jac.shape[1] == jac.shape[2]:
        det = torch.linalg.det(jac)  # (N,)
        positive = float((det > 0).double().mean())
        out.update({"det_positive_fraction": positive, "det_same_sign": positive in (0.0, 1.0),
                    "det_abs_min": float(det.abs().min()), "det_abs_median": float(det.abs().median())})
    else:
        smallest = torch.linalg.svdvals(jac)[:, -1]  # (N,)
        out.update({"min_singular_value": float(smallest.min()),
                    "median_min_singular_value": float(smallest.median())})
    return out
