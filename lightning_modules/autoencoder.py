"""What the two autoencoders (WAE and PrimalDual) share: an encoder E and a decoder G, deterministic
or Gaussian codes, and the reconstruction cost (docs/theory.md 3.2).

A Gaussian encoder outputs (mean, log_var) of N(mu(x), diag sigma^2(x)), log_var clamped to
`maths.gaussian_codes.LOG_VAR_RANGE`; its code is one reparameterised draw mu + sigma * eps,
differentiable in both.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from lightning_modules.base import GenerativeModule
from lightning_modules.networks import build_decoder, build_encoder
from maths.choices import check_choice
from maths.gaussian_codes import ENCODER_TYPES, gaussian_code_parameters, reparameterize
from transport.costs import check_cost_name, cost


class Autoencoder(GenerativeModule):
    """Base of the autoencoders: builds (or takes) the encoder and the decoder, and encodes.

    Args: as the subclasses' (data_shape, latent_dim, prior, cost, encoder_type, width,
    encoder_channels, decoder_channels, output_activation, upsample, init), and `encoder` / `decoder`
    networks that replace the builders' when given.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        prior: str,
        cost: str,
        encoder_type: str,
        width: int,
        encoder_channels: list[int] | None,
        decoder_channels: list[int] | None,
        output_activation: str,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        upsample: str = "transposed",
        init: str = "default",
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        check_cost_name(cost)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        self.gaussian = encoder_type == "gaussian"
        code_size = latent_dim * (2 if self.gaussian else 1)
        if encoder is None:
            encoder = build_encoder(self.data_shape, code_size, width, encoder_channels, init=init)
        self.encoder = encoder
        self.decoder = decoder if decoder is not None else build_decoder(
            self.data_shape, latent_dim, width, decoder_channels, self.resolve_output_activation(output_activation),
            upsample=upsample, init=init,
        )
        self._cost = cost

    def encode(self, x: Tensor) -> Tensor:
        """A latent code of each sample: E(x), or a reparameterised draw for a Gaussian encoder.
        (B, *data_shape) -> (B, latent_dim)."""
        return self.encode_with_parameters(x)[0]

    def encode_parameters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clamped log-variance of a Gaussian encoder. (B, *data_shape) -> 2 x (B, latent_dim)."""
        if not self.gaussian:
            raise ValueError("encode_parameters needs encoder_type='gaussian'; a deterministic encoder has no variance.")
        return gaussian_code_parameters(self.encoder(x))

    def encode_with_parameters(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(codes (B, latent_dim), (mean, log_var) for a Gaussian encoder or None): one encoder pass."""
        if not self.gaussian:
            return self.encoder(x), None
        parameters = self.encode_parameters(x)
        return reparameterize(*parameters), parameters

    def reconstruction_cost(self, x: Tensor, x_rec: Tensor) -> Tensor:
        """E c(x, G(E(x))) over the batch."""
        return cost(x, x_rec, self._cost).mean()

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's and the decoder's parameters: what the autoencoder's optimiser updates."""
        return [*self.encoder.parameters(), *self.decoder.parameters()]
