"""Latent priors P_Z (docs/theory.md section 1): the standard normal, the uniform distribution on
the unit sphere S^{d-1}, and the uniform distribution on the cube [-1, 1]^d."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from maths.choices import check_choice

PriorName = Literal["gaussian", "sphere", "cube"]
PRIOR_NAMES: tuple[str, ...] = get_args(PriorName)


def check_prior_name(name: str) -> None:
    """Raise ValueError listing the prior names if `name` is not one."""
    check_choice("prior", name, PRIOR_NAMES)


def sample_prior(
    name: str,
    num_samples: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw (num_samples, dim) latent codes: gaussian N(0, I), sphere (uniform on the unit sphere
    S^{dim-1}) or cube (uniform on [-1, 1]^dim), on `device` (drawn there: no host copy)."""
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
