"""Encoder, decoder and critic builders shared by every model (docs/theory.md section 1).

Data of shape (D,) (2-D toy points, flat vectors) get MLPs; images of shape (C, H, W) get
DCGAN-style convolutional networks (Radford et al. 2016): stride-2 4x4 convolutions that halve
the image, batch norm and ReLU in the encoder and decoder, LeakyReLU and no batch norm in the
critic (batch norm would make the critic's value on one image depend on the rest of the batch,
and break its Lipschitz certificate). The number of halvings is read off the image size:
8x8 -> 4x4 (1), 28x28 -> 7x7 (2), 32x32 -> 4x4 (3), 64x64 -> 4x4 (4).

Two options of the builders change how the networks start and how the decoder doubles its grid:
- `upsample`: "transposed" (stride-2 4x4 transposed convolutions, DCGAN's) or "resize" (nearest-
  neighbour doubling followed by a 3x3 convolution, Odena, Dumoulin, Olah, "Deconvolution and
  checkerboard artifacts", Distill 2016). A stride-2 transposed convolution gives the even and the
  odd output pixels different kernel taps, so even a spatially constant input comes out as a
  2-periodic pattern (a checkerboard) that training must undo; resize + convolution maps a constant
  input to a constant output away from the border.
- `init`: "default" (PyTorch's) or "dcgan" (Radford et al. 2016: convolution and linear weights
  N(0, 0.02), batch-norm scales N(1, 0.02), biases 0), see `init_weights`.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from maths.choices import check_choice
from maths.layers import MaxMin, Squeeze, conv_operator_spectral_norm

OutputActivation = Literal["auto", "tanh", "none"]  # "auto": tanh for images, none for vectors
OUTPUT_ACTIVATIONS: tuple[str, ...] = get_args(OutputActivation)[1:]  # what a decoder is built with
Upsample = Literal["transposed", "resize"]
UPSAMPLES: tuple[str, ...] = get_args(Upsample)
Init = Literal["default", "dcgan"]
INITS: tuple[str, ...] = get_args(Init)
DCGAN_STD = 0.02


def check_data_shape(data_shape: Sequence[int]) -> tuple[int, ...]:
    """Return data_shape as a tuple if it is (D,) or (C, H, W) with H, W >= 4; else ValueError."""
    shape = tuple(int(s) for s in data_shape)
    flat_ok = len(shape) == 1 and shape[0] >= 1
    image_ok = len(shape) == 3 and shape[0] >= 1 and min(shape[1:]) >= 4
    if not (flat_ok or image_ok):
        raise ValueError(
            f"data_shape must be (D,) for vectors or (C, H, W) with H, W >= 4 for images, got {shape}."
        )
    return shape


def is_image_shape(data_shape: Sequence[int]) -> bool:
    return len(data_shape) == 3


def conv_plan(height: int, width: int) -> tuple[int, int, int]:
    """(number of stride-2 halvings, base height, base width): halve while both sides are even
    and stay >= 4, so that the decoder's doublings land exactly on (height, width)."""
    halvings = 0
    while height % 2 == 0 and width % 2 == 0 and height >= 8 and width >= 8:
        height, width, halvings = height // 2, width // 2, halvings + 1
    return halvings, height, width


def _maybe_sn(layer: nn.Module, spectral_norm: bool) -> nn.Module:
    return _spectral_norm(layer) if spectral_norm else layer


CriticActivation = Literal["leaky_relu", "maxmin"]
CRITIC_ACTIVATIONS: tuple[str, ...] = get_args(CriticActivation)
ACTIVATIONS: tuple[str, ...] = ("relu", *CRITIC_ACTIVATIONS)


def build_activation(name: str) -> nn.Module:
    """"relu", "leaky_relu" (slope 0.2) or "maxmin" (`maths.layers.MaxMin`); all 1-Lipschitz."""
    check_choice("activation", name, ACTIVATIONS)
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "maxmin": MaxMin}[name]()


def init_weights(network: nn.Module, init: str = "default") -> nn.Module:
    """Initialise `network` in place and return it. "default" leaves PyTorch's initialisation;
    "dcgan" draws every convolution, transposed convolution and linear weight from N(0, 0.02) and
    every batch-norm scale from N(1, 0.02), with zero biases (Radford et al. 2016, section 4). A
    spectrally normalised layer gets the draw in its unnormalised weight (the parametrization's
    `original`), which the normalisation then rescales."""
    check_choice("init", init, INITS)
    if init == "default":
        return network
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                weights = getattr(module, "parametrizations", None)
                weight = weights.weight.original if weights is not None and "weight" in weights else module.weight
                weight.normal_(0.0, DCGAN_STD)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.normal_(1.0, DCGAN_STD)
                module.bias.zero_()
    return network


def build_mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "relu",
    spectral_norm: bool = False,
) -> nn.Sequential:
    """Linear layers with `activation` (see `build_activation`) between them."""
    layers: list[nn.Module] = []
    sizes = [in_features, *hidden]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers.append(_maybe_sn(nn.Linear(a, b), spectral_norm))
        layers.append(build_activation(activation))
    layers.append(_maybe_sn(nn.Linear(sizes[-1], out_features), spectral_norm))
    return nn.Sequential(*layers)


def default_channels(data_shape: Sequence[int], width: int) -> list[int]:
    """Encoder / critic channels width * 2^i, one entry per halving of the image."""
    halvings, _, _ = conv_plan(data_shape[1], data_shape[2])
    return [width * 2**i for i in range(max(halvings, 1))]


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, out_features): stride-2 convolutions, then a linear layer."""

    def __init__(
        self,
        data_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int],
        batch_norm: bool = True,
        activation: str = "relu",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_shape = tuple(data_shape)  # (C, H, W) entering the next convolution
        for i, out_ch in enumerate(channels):
            if min(in_shape[1:]) < 2:  # a 4x4 stride-2 convolution needs at least 2x2 pixels
                raise ValueError(
                    f"The encoder halves the image once per channel entry, so images of shape "
                    f"{tuple(data_shape)} allow at most {i} entries; got {list(channels)}. Use fewer "
                    "encoder_channels (or critic_channels), or larger images."
                )
            conv = nn.Conv2d(in_shape[0], out_ch, 4, stride=2, padding=1)
            if spectral_norm:  # normalise the convolution operator, not the reshaped kernel
                conv_operator_spectral_norm(conv, in_shape)
            layers.append(conv)
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(build_activation(activation))
            in_shape = (out_ch, in_shape[1] // 2, in_shape[2] // 2)  # k=4, s=2, p=1 halves (floor)
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(2, *data_shape)).flatten(1).shape[1]
        self.head = _maybe_sn(nn.Linear(flat, out_features), spectral_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(start_dim=1))  # (B, out_features)


class ConvDecoder(nn.Module):
    """(B, latent_dim) -> (B, C, H, W): a linear layer to channels[0] on a (H, W) / 2^k grid, one
    doubling of the grid per further entry of `channels` (k of them), then a 3x3 convolution to C
    channels. `upsample` "transposed": each doubling is a stride-2 4x4 transposed convolution;
    "resize": a nearest-neighbour doubling followed by a 3x3 convolution (no checkerboard pattern,
    see the module docstring). Batch norm and ReLU follow the projection and every doubling."""

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        channels: Sequence[int],
        output_activation: str = "tanh",
        upsample: Upsample = "transposed",
    ) -> None:
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        self.upsample_mode = upsample
        doublings = len(channels) - 1
        height, width = data_shape[1], data_shape[2]
        if len(channels) < 1 or height % 2**doublings or width % 2**doublings:
            halvings = conv_plan(height, width)[0]
            raise ValueError(
                f"The decoder doubles its grid once per channel entry after the first, so for images of "
                f"shape {tuple(data_shape)} it needs 1 or more entries with both sides divisible by "
                f"2^(entries - 1) (the default has {halvings + 1}); got {list(channels)}."
            )
        base_h, base_w = height // 2**doublings, width // 2**doublings
        self.base = (channels[0], base_h, base_w)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, channels[0] * base_h * base_w),
            nn.Unflatten(1, self.base),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for in_ch, out_ch in zip(channels[:-1], channels[1:]):
            if upsample == "transposed":
                layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1))
            else:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1)]
            layers += [nn.BatchNorm2d(out_ch), nn.ReLU()]
        layers.append(nn.Conv2d(channels[-1], data_shape[0], 3, padding=1))
        if output_activation == "tanh":
            layers.append(nn.Tanh())
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.upsample(self.project(z))  # (B, C, H, W)


class MLPDecoder(nn.Module):
    """(B, latent_dim) -> (B, D) through an MLP, with an optional tanh output."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int], output_activation: str) -> None:
        super().__init__()
        self.net = build_mlp(latent_dim, hidden, data_dim)
        self.out = nn.Tanh() if output_activation == "tanh" else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.net(z))


def build_encoder(
    data_shape: Sequence[int], out_features: int, width: int = 64, channels: Sequence[int] | None = None,
    init: Init = "default",
) -> nn.Module:
    """Encoder (B, *data_shape) -> (B, out_features). MLPs use three hidden layers of `width`.
    `init`: "default" or "dcgan" (`init_weights`)."""
    shape = check_data_shape(data_shape)
    if not is_image_shape(shape):
        return init_weights(build_mlp(shape[0], [width] * 3, out_features), init)
    return init_weights(ConvEncoder(shape, out_features, channels or default_channels(shape, width)), init)


def build_decoder(
    data_shape: Sequence[int],
    latent_dim: int,
    width: int = 64,
    channels: Sequence[int] | None = None,
    output_activation: str = "tanh",
    upsample: Upsample = "transposed",
    init: Init = "default",
) -> nn.Module:
    """Decoder / generator (B, latent_dim) -> (B, *data_shape); `output_activation` "tanh" for
    data in [-1, 1], "none" for unbounded data. Default channels mirror the encoder's. Images:
    `upsample` "transposed" or "resize" (`ConvDecoder`; MLPs ignore it); `init` "default" or
    "dcgan" (`init_weights`)."""
    shape = check_data_shape(data_shape)
    check_choice("output activation", output_activation, OUTPUT_ACTIVATIONS)
    check_choice("upsample", upsample, UPSAMPLES)
    if not is_image_shape(shape):
        return init_weights(MLPDecoder(shape[0], latent_dim, [width] * 3, output_activation), init)
    if channels is None:
        halvings = conv_plan(shape[1], shape[2])[0]
        channels = [width * 2**i for i in reversed(range(halvings + 1))]
    return init_weights(ConvDecoder(shape, latent_dim, channels, output_activation, upsample), init)


def build_critic(
    data_shape: Sequence[int],
    width: int = 64,
    channels: Sequence[int] | None = None,
    depth: int = 3,
    spectral_norm: bool = False,
    activation: str = "leaky_relu",
    init: Init = "default",
) -> nn.Module:
    """Critic (B, *data_shape) -> (B,) with a 1-Lipschitz `activation` ("leaky_relu", slope 0.2,
    or "maxmin", see `maths.layers.MaxMin`; widths and channels must then be even) and no batch norm.
    `init`: "default" or "dcgan" (`init_weights`).

    Flat data get an MLP of `depth` hidden layers of `width`; images a convolutional critic.
    `spectral_norm` divides every layer by its operator norm: torch's spectral normalisation for
    linear layers, `conv_operator_spectral_norm` for convolutions (torch's would normalise the
    reshaped kernel, which does not bound the convolution operator).
    """
    shape = check_data_shape(data_shape)
    check_choice("critic activation", activation, CRITIC_ACTIVATIONS)
    sizes = [width] if not is_image_shape(shape) else list(channels or default_channels(shape, width))
    if activation == "maxmin" and any(size % 2 for size in sizes):
        raise ValueError(f"critic_activation='maxmin' sorts pairs of features, so critic widths and channels must be "
                         f"even; got {sizes}.")
    if not is_image_shape(shape):
        body = build_mlp(shape[0], [width] * depth, 1, activation=activation, spectral_norm=spectral_norm)
    else:
        body = ConvEncoder(
            shape,
            1,
            channels or default_channels(shape, width),
            batch_norm=False,
            activation=activation,
            spectral_norm=spectral_norm,
        )
    return init_weights(nn.Sequential(body, Squeeze()), init)
