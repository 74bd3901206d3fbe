"""Network builders: sizes for every supported data shape, output ranges, critic properties."""

import pytest
import torch
from torch import nn

from lightning_modules.networks import build_critic, build_decoder, build_encoder, conv_plan

SHAPES = [(2,), (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_encoder_decoder_critic_shapes(shape):
    x = torch.randn(3, *shape)
    assert build_encoder(shape, 5, width=8)(x).shape == (3, 5)
    assert build_decoder(shape, 4, width=8)(torch.randn(3, 4)).shape == (3, *shape)
    assert build_critic(shape, width=8)(x).shape == (3,)


def test_conv_plan_halves_to_the_documented_grids():
    assert conv_plan(8, 8) == (1, 4, 4)
    assert conv_plan(28, 28) == (2, 7, 7)
    assert conv_plan(32, 32) == (3, 4, 4)
    assert conv_plan(64, 64) == (4, 4, 4)


def test_decoder_output_range_matches_activation():
    z = 50.0 * torch.randn(16, 4)  # large codes push the pre-activation far out
    bounded = build_decoder((1, 8, 8), 4, width=8, output_activation="tanh")(z)
    assert bounded.abs().max() <= 1.0
    unbounded = build_decoder((2,), 4, width=8, output_activation="none")
    with torch.no_grad():
        unbounded.net[-1].bias.fill_(5.0)
    assert unbounded(z).abs().max() > 1.0


def test_critic_has_no_batch_norm_and_is_per_sample():
    critic = build_critic((1, 8, 8), width=8).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(critic(x)[:2], critic(x[:2]))  # a sample's value ignores the batch


@pytest.mark.parametrize("shape", [(2,), (1, 28, 28)])
def test_spectral_norm_wraps_every_weight_layer(shape):
    critic = build_critic(shape, width=8, spectral_norm=True)
    layers = [m for m in critic.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)


def test_paper_channel_lists_are_accepted():
    """WAE paper MNIST: encoder 128-256-512-1024, decoder from 7x7x1024 via 512 and 256."""
    enc = build_encoder((1, 28, 28), 8, channels=[128, 256, 512, 1024])
    dec = build_decoder((1, 28, 28), 8, channels=[1024, 512, 256])
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 8)
    assert dec(torch.randn(2, 8)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("bad", [(1, 2, 2), (3, 8), (), (0,)])
def test_bad_data_shape_is_rejected(bad):
    with pytest.raises(ValueError, match="data_shape must be"):
        build_encoder(bad, 4)


def test_decoder_channel_count_error_names_the_limit():
    with pytest.raises(ValueError, match=r"divisible by 2\^\(entries - 1\) \(the default has 3\)"):
        build_decoder((1, 28, 28), 8, channels=[64, 32, 16, 8])


def test_unknown_output_activation_lists_choices():
    with pytest.raises(ValueError, match="tanh, none"):
        build_decoder((2,), 4, output_activation="sigmoid")


def test_critic_activation_choices_and_even_widths_for_maxmin():
    assert build_critic((1, 8, 8), width=8, activation="maxmin")(torch.randn(3, 1, 8, 8)).shape == (3,)
    with pytest.raises(ValueError, match="leaky_relu, maxmin"):
        build_critic((2,), activation="relu")
    with pytest.raises(ValueError, match="even"):
        build_critic((2,), width=15, activation="maxmin")
    with pytest.raises(ValueError, match="even"):
        build_critic((1, 8, 8), channels=[8, 5], activation="maxmin")
