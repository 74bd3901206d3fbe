"""Network builders: sizes for every supported data shape, output ranges, critic properties; and
networks given to the models instead of the builders'."""

import pytest
import torch
from torch import nn

from datamodules import DigitsDataModule
from lightning_modules import FGAN, WAE, PrimalDual, SinkhornGenerator
from lightning_modules.networks import build_critic, build_decoder, build_encoder, conv_plan
from maths.layers import Squeeze

SHAPES = [(2,), (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]

pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.raises(ValueError, match=r"^Unknown output activation 'sigmoid'\. Valid choices: tanh, none\.$"):
        build_decoder((2,), 4, output_activation="sigmoid")


def test_critic_activation_choices_and_even_widths_for_maxmin():
    assert build_critic((1, 8, 8), width=8, activation="maxmin")(torch.randn(3, 1, 8, 8)).shape == (3,)
    with pytest.raises(ValueError, match=r"^Unknown critic activation 'relu'\. Valid choices: leaky_relu, maxmin\.$"):
        build_critic((2,), activation="relu")
    with pytest.raises(ValueError, match="even"):
        build_critic((2,), width=15, activation="maxmin")
    with pytest.raises(ValueError, match="even"):
        build_critic((1, 8, 8), channels=[8, 5], activation="maxmin")


# ---- networks given to the models instead of the builders' ---------------------------------------


def generator(latent_dim: int) -> nn.Module:
    """(B, latent_dim) -> (B, 1, 8, 8) in [-1, 1]."""
    return nn.Sequential(nn.Linear(latent_dim, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))


def encoder(latent_dim: int) -> nn.Module:
    """(B, 1, 8, 8) -> (B, latent_dim)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, latent_dim))


def critic(in_features: int) -> nn.Module:
    """(B, in_features) or (B, 1, 8, 8) -> (B,)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1), Squeeze())


# model, its other arguments, its networks, and where the model keeps each network
INJECTED = {
    "fgan": (FGAN, dict(latent_dim=4), lambda: dict(generator=generator(4), critic=critic(64))),
    "wae": (WAE, dict(latent_dim=4, latent_penalty="f"),
            lambda: dict(encoder=encoder(4), decoder=generator(4), latent_critic=critic(4))),
    "primal_dual": (PrimalDual, dict(latent_dim=4, mc_samples=64),
                    lambda: dict(encoder=encoder(4), decoder=generator(4), critic=critic(64), latent_critic=critic(4))),
    "sinkhorn_generator": (SinkhornGenerator, dict(latent_dim=4, blur=0.5), lambda: dict(generator=generator(4))),
}
HELD_AS = {"generator": "decoder", "decoder": "decoder", "encoder": "encoder", "critic": "critic.network",
           "latent_critic": "latent_critic.network"}


def held(model: nn.Module, key: str) -> nn.Module:
    return model.get_submodule(HELD_AS[key])


@pytest.mark.parametrize("name", INJECTED)
def test_injected_networks_are_the_models_own_and_train(name, quiet_trainer):
    cls, kwargs, make = INJECTED[name]
    networks = make()
    before = {key: [p.detach().clone() for p in net.parameters()] for key, net in networks.items()}
    model = cls(data_shape=(1, 8, 8), **kwargs, **networks)
    assert all(held(model, key) is net for key, net in networks.items())
    assert not set(networks) & set(model.hparams)  # modules are not hyperparameters
    quiet_trainer(fast_dev_run=True).fit(model, datamodule=DigitsDataModule(batch_size=16))
    for key, net in networks.items():  # one training batch updated every network
        assert any(not torch.equal(a, b) for a, b in zip(before[key], net.parameters())), f"{key} was not trained"


def test_an_injected_fgan_critic_round_trips_through_a_checkpoint(checkpoint_round_trip):
    """load_from_checkpoint takes the networks again and fills them with the trained weights."""
    networks = dict(generator=generator(4), critic=critic(64))
    model = FGAN(data_shape=(1, 8, 8), latent_dim=4, **networks)
    keys = list(model.state_dict())
    assert {key.split(".")[0] for key in keys} == {"decoder", "critic"}
    assert all(key.startswith("critic.network.") for key in keys if key.startswith("critic"))
    fresh = dict(generator=generator(4), critic=critic(64))
    loaded = checkpoint_round_trip(model, **fresh)
    assert loaded.decoder is fresh["generator"] and loaded.critic.network is fresh["critic"]
    trained, filled = model.critic.network.state_dict(), fresh["critic"].state_dict()
    assert list(trained) == list(filled) and all(torch.equal(trained[key], filled[key]) for key in trained)


def test_primal_dual_samples_and_reconstructs_with_an_injected_decoder():
    decoder = generator(4)
    model = PrimalDual(data_shape=(1, 8, 8), latent_dim=4, width=8, critic_width=8, latent_critic_width=8,
                       decoder=decoder)
    z = model.sample_latent(5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.sample(5, generator=torch.Generator().manual_seed(0)), decoder(z))
        x = torch.rand(6, 1, 8, 8) * 2 - 1
        codes = model.encode(x)
        _, recon, _ = model.primal_loss(x, codes, torch.randn(6, 4))
        expected = (x - decoder(codes)).flatten(1).norm(dim=1).mean()  # c = l2, PrimalDual's default
    torch.testing.assert_close(recon, expected)


@pytest.mark.parametrize("name", INJECTED)
def test_an_empty_sequential_is_injected_too(name):
    """nn.Sequential() (an identity map) has length 0, so it is falsy: it must still replace the builder's network."""
    cls, kwargs, make = INJECTED[name]
    for key in make():
        identity = nn.Sequential()
        assert held(cls(data_shape=(1, 8, 8), **kwargs, **{key: identity}), key) is identity, key


# ---- decoder upsampling and weight initialisation ---------------------------------------------------


def constant_code_decoder(upsample: str, seed: int = 0) -> nn.Module:
    """A 28x28 decoder (eval mode, random weights) whose projection ignores the code and gives each
    channel one random constant: every code enters the upsampling stack as a spatially constant map."""
    torch.manual_seed(seed)
    decoder = build_decoder((1, 28, 28), 4, channels=[16, 8, 4], upsample=upsample, output_activation="none").eval()
    linear = decoder.project[0]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.randn(16).repeat_interleave(7 * 7))  # (16 x 7 x 7,): constant per channel
    return decoder


def checkerboard(images: torch.Tensor, border: int = 4) -> float:
    """The largest deviation of the mean of a 2x2 polyphase component (even / odd rows x even / odd
    columns) from the mean of the image, inside a margin of `border` pixels, relative to the mean
    absolute value of the images: 0 for an image without a 2-periodic pattern."""
    inner = images[..., border:-border, border:-border]
    phases = torch.stack([inner[..., a::2, b::2].mean(dim=(-2, -1)) for a in (0, 1) for b in (0, 1)])  # (4, B, C)
    return float((phases - phases.mean(dim=0)).abs().max() / images.abs().mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resize_decoder_makes_no_checkerboard_where_transposed_convolutions_do(seed):
    """A constant code: the transposed convolutions give even and odd pixels different kernel taps (a
    2-periodic pattern); nearest-neighbour doubling + 3x3 convolution keeps the map constant away from
    the zero-padded border (4 pixels at 28x28: two doublings, two 3x3 convolutions and the last one)."""
    z = torch.randn(3, 4)
    with torch.no_grad():
        transposed = constant_code_decoder("transposed", seed)(z)
        resized = constant_code_decoder("resize", seed)(z)
    assert transposed.shape == resized.shape == (3, 1, 28, 28)
    assert checkerboard(transposed) > 0.05
    assert checkerboard(resized) < 1e-5
    inner = resized[..., 4:-4, 4:-4]
    assert (inner - inner.mean(dim=(-2, -1), keepdim=True)).abs().max() < 1e-5 * resized.abs().mean()


def test_resize_decoder_has_no_transposed_convolution_and_fits_every_shape():
    for shape in SHAPES[1:]:
        decoder = build_decoder(shape, 4, width=8, upsample="resize")
        assert decoder(torch.randn(2, 4)).shape == (2, *shape)
        assert not any(isinstance(m, nn.ConvTranspose2d) for m in decoder.modules())
        assert sum(isinstance(m, nn.Upsample) for m in decoder.modules()) == conv_plan(*shape[1:])[0]
    with pytest.raises(ValueError, match=r"^Unknown upsample 'bilinear'\. Valid choices: transposed, resize\.$"):
        build_decoder((1, 8, 8), 4, upsample="bilinear")


def weight_layers(network: nn.Module) -> list[torch.Tensor]:
    """The weights of the convolutions and linear layers (the unnormalised ones under spectral norm)."""
    weights = []
    for m in network.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            p = getattr(m, "parametrizations", None)
            weights.append((p.weight.original if p is not None else m.weight).detach())
    return weights


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_dcgan_init_draws_weights_with_standard_deviation_0_02(spectral_norm):
    torch.manual_seed(0)
    networks = [build_decoder((1, 28, 28), 8, width=16, init="dcgan"), build_encoder((1, 28, 28), 8, width=16, init="dcgan"),
                build_critic((1, 28, 28), width=16, spectral_norm=spectral_norm, init="dcgan")]
    for network in networks:
        for weight in weight_layers(network):
            if weight.numel() >= 2000:  # enough draws for the sample std to be within 10% of 0.02
                assert 0.018 < float(weight.std()) < 0.022 and abs(float(weight.mean())) < 0.002
        for m in network.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
            if isinstance(m, nn.BatchNorm2d) and m.num_features >= 16:
                scale = m.weight.detach()
                assert abs(float(scale.mean()) - 1) < 0.02 and 0.005 < float(scale.std()) < 0.04
                assert torch.count_nonzero(m.bias) == 0
    # PyTorch's default is far from N(0, 0.02) on the first convolution (fan-in 16: std 0.14)
    assert float(weight_layers(build_critic((1, 28, 28), width=16))[0].std()) > 0.08
    with pytest.raises(ValueError, match=r"^Unknown init 'xavier'\. Valid choices: default, dcgan\.$"):
        build_critic((2,), init="xavier")


@pytest.mark.parametrize("cls", [FGAN, WAE, PrimalDual, SinkhornGenerator])
def test_models_build_their_networks_with_the_upsample_and_init_options(cls):
    torch.manual_seed(0)
    model = cls(data_shape=(1, 8, 8), upsample="resize", init="dcgan")
    assert model.hparams.upsample == "resize" and model.hparams.init == "dcgan"
    assert any(isinstance(m, nn.Upsample) for m in model.decoder.modules())
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.decoder.modules())
    projection = model.decoder.project[0].weight.detach()
    assert 0.018 < float(projection.std()) < 0.022
    default = cls(data_shape=(1, 8, 8))
    assert default.hparams.upsample == "transposed" and default.hparams.init == "default"
    assert any(isinstance(m, nn.ConvTranspose2d) for m in default.decoder.modules())
    assert model.sample(2).shape == (2, 1, 8, 8)
