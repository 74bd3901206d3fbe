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
