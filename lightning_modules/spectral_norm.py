"""Spectral normalisation of a convolution as an operator on images (SPEC section 4).

torch's `spectral_norm` divides a conv kernel by the largest singular value of the kernel
reshaped to an (out, in * kh * kw) matrix. That is not the operator norm of the convolution
x -> conv(x, W) on images: overlapping patches make the operator norm larger (by up to
sqrt(kh * kw) / stride), so a "spectrally normalised" conv critic is not 1-Lipschitz and its
dual value certifies nothing. This parametrization divides the kernel by the operator norm of
the convolution itself on inputs of a given shape, tracked by power iteration on
A = conv(., W) and its adjoint A^T = conv_transpose(., W), one step per training forward, as
torch does for matrices (Miyato et al. 2018; the conv operator version of Gouk et al. 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


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
