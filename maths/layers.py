"""Layers whose Lipschitz constants the certificate knows, and `eval_mode` (docs/theory.md 4.3).

- `MaxMin`: GroupSort with groups of two (Anil, Lucas, Grosse 2019), a 1-Lipschitz activation
  whose Jacobian is a permutation, so it keeps the norm of gradients where ReLU-type activations
  shrink them: under a per-layer norm constraint it lets a critic get close to the best
  1-Lipschitz function.
- `Squeeze`: (B, 1) -> (B,), the last layer of every critic.
- `ConvOperatorNorm`: spectral normalisation of a convolution as an operator on images. torch's
  `spectral_norm` divides a conv kernel by the largest singular value of the kernel reshaped to an
  (out, in * kh * kw) matrix, which is not the operator norm of x -> conv(x, W): overlapping
  patches make the latter larger (by up to sqrt(ceil(kh / s) ceil(kw / s)) for stride s), so such a critic is not
  1-Lipschitz and its dual value certifies nothing. This parametrization divides the kernel by the
  operator norm of the convolution itself on inputs of a given shape, tracked by power iteration on
  A = conv(., W) and its adjoint A^T = conv_transpose(., W), one step per training forward, as
  torch does for matrices (Miyato et al. 2018; the operator version of Gouk et al. 2021).
- `eval_mode`: a module in eval mode inside a block, every submodule's own flag restored after.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maths.precision import autocast_off


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block; afterwards every submodule gets its own previous
    mode back (a submodule kept in eval mode on purpose stays so)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class MaxMin(nn.Module):
    """GroupSort of pairs: features (dim 1) split into halves a and b, returned as
    (max(a, b), min(a, b)). (B, 2k, ...) -> (B, 2k, ...); 1-Lipschitz in l2."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"MaxMin pairs up features along dim 1, which needs an even size; got {tuple(x.shape)}.")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class Squeeze(nn.Module):
    """(B, 1) -> (B,)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(-1)


class ConvOperatorNorm(nn.Module):
    """Parametrization W -> W / sigma(W), sigma the l2 operator norm of conv(., W) on (C, H, W) inputs."""

    def __init__(self, conv: nn.Conv2d, input_shape: tuple[int, int, int], n_power_iterations: int = 1) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.n_power_iterations = n_power_iterations
        weight = conv.weight.detach()
        u = torch.randn(1, *input_shape, dtype=weight.dtype, device=weight.device)
        self.register_buffer("u", u / u.norm())  # (1, C, H, W): the top right-singular vector estimate
        out_h, out_w = self._conv(self.u, weight).shape[-2:]
        self.output_padding = tuple(
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(
                input_shape[1:], (out_h, out_w), self.stride, self.padding, self.dilation, weight.shape[-2:]
            )
        )
        with torch.no_grad():
            for _ in range(100):  # start from a (nearly) converged estimate
                self._power_step(weight)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def _conv_adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(
            y, weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )

    def _power_step(self, weight: Tensor) -> None:
        v = self._conv(self.u, weight)
        u = self._conv_adjoint(v / v.norm().clamp_min(1e-12), weight)
        self.u.copy_(u / u.norm().clamp_min(1e-12))

    def forward(self, weight: Tensor) -> Tensor:
        with autocast_off(weight.device):  # the power iteration and sigma in the weight's dtype
            if self.training:
                with torch.no_grad():
                    for _ in range(self.n_power_iterations):
                        self._power_step(weight)
            # ||A u|| with ||u|| = 1, differentiable in W; u is cloned because the next forward
            # updates the buffer in place while this graph may still need it for backward.
            sigma = self._conv(self.u.clone(), weight).norm()
        return weight / sigma


def conv_operator_spectral_norm(
    conv: nn.Conv2d, input_shape: tuple[int, int, int], n_power_iterations: int = 1
) -> nn.Conv2d:
    """Register `ConvOperatorNorm` on `conv.weight` for inputs of shape (C, H, W); returns conv."""
    parametrize.register_parametrization(conv, "weight", ConvOperatorNorm(conv, input_shape, n_power_iterations))
    return conv
