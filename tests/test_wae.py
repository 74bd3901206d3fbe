"""The WAE family on the offline digits data: API, training quality, checkpoints, bad input."""

import lightning as L
import pytest
import torch

from datamodules import DigitsDataModule, GaussianMixtureDataModule
from lightning_modules import WAE
from maths.mmd import mmd_unbiased

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster on shared cores

VARIANTS = {
    "mmd": dict(latent_penalty="mmd", lambda_=10.0),
    "gan": dict(latent_penalty="gan", lambda_=1.0),
    "f_jensen_shannon": dict(latent_penalty="f", divergence="jensen_shannon", lambda_=1.0),
    "f_kl": dict(latent_penalty="f", divergence="kl", lambda_=1.0),
}


def mean_image_cost(dm: DigitsDataModule) -> float:
    """Validation l2sq cost of always predicting the mean training image."""
    train_x = torch.cat([x for x, _ in dm.train_dataloader()])
    val_x = torch.cat([x for x, _ in dm.val_dataloader()])
    return (val_x - train_x.mean(0)).pow(2).flatten(1).sum(1).mean().item()


@pytest.mark.parametrize("name", VARIANTS)
def test_wae_reconstructs_digits_far_better_than_the_mean_image(name, quiet_trainer):
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    model = WAE(data_shape=dm.dims, latent_dim=8, width=32, **VARIANTS[name])
    trainer = quiet_trainer(max_epochs=15)
    trainer.fit(model, datamodule=dm)
    recon = trainer.callback_metrics["val/recon"].item()
    baseline = mean_image_cost(dm)
    print(f"{name}: validation reconstruction cost {recon:.3f}, mean-image cost {baseline:.3f}")
    assert recon < baseline / 3
    assert torch.isfinite(trainer.callback_metrics["val/primal"])


def test_sample_and_encode_shapes_and_range():
    model = WAE(data_shape=(1, 8, 8), latent_dim=5, width=8)
    samples = model.sample(7)
    assert samples.shape == (7, 1, 8, 8) and samples.abs().max() <= 1.0
    assert model.encode(torch.randn(4, 1, 8, 8)).shape == (4, 5)
    assert model.training  # sample() restores the training mode


def test_vector_data_gets_unbounded_output():
    model = WAE(data_shape=(2,), latent_dim=2, width=16)
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(3.0)
    assert model.sample(5).shape == (5, 2) and model.sample(5).abs().max() > 1.0


def test_gaussian_encoder_is_stochastic():
    model = WAE(data_shape=(2,), latent_dim=2, encoder_type="gaussian").eval()
    x = torch.randn(4, 2)
    assert not torch.allclose(model.encode(x), model.encode(x))


def test_mmd_penalty_is_the_unbiased_mmd_against_prior_draws():
    model = WAE(data_shape=(2,), latent_dim=3, kernel="rbf")
    z = torch.randn(50, 3) + 2.0
    torch.manual_seed(1)
    penalty, loss = model.latent_penalty(z)
    torch.manual_seed(1)
    expected = mmd_unbiased(z, torch.randn(50, 3), kernel="rbf", base_scale=6.0)
    torch.testing.assert_close(penalty, expected)
    assert loss is penalty


def test_critic_penalty_is_the_registry_variational_estimate():
    model = WAE(data_shape=(2,), latent_dim=3, latent_penalty="f", divergence="pearson")
    z = torch.randn(40, 3)
    torch.manual_seed(2)
    penalty, _ = model.latent_penalty(z)
    torch.manual_seed(2)
    v_p, v_q = model.latent_critic(z), model.latent_critic(torch.randn(40, 3))
    expected = (v_p.mean() - (v_q**2 / 4 + v_q).mean())  # pearson: g(v) = v, f*(t) = t^2/4 + t
    torch.testing.assert_close(penalty, expected)


def test_wae_trains_on_the_2d_toy_data(quiet_trainer):
    dm = GaussianMixtureDataModule(num_samples=512, num_val_samples=128, num_test_samples=128, batch_size=128)
    model = WAE(data_shape=dm.dims, latent_dim=2, width=32, latent_penalty="gan", lambda_=1.0)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/primal"])


def test_checkpoint_round_trip(checkpoint_round_trip):
    model = WAE(data_shape=(1, 8, 8), latent_dim=4, width=8, latent_penalty="f", divergence="kl")
    loaded = checkpoint_round_trip(model)
    assert loaded.hparams.divergence == "kl" and loaded.data_shape == (1, 8, 8)


def test_loading_weights_into_another_latent_dim_says_so(tmp_path, quiet_trainer):
    model = WAE(data_shape=(1, 8, 8), latent_dim=4, width=8)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(tmp_path / "wae.ckpt")
    with pytest.raises(ValueError, match=r"built with latent_dim=6.*\(4, 128\) in the checkpoint"):
        WAE.load_from_checkpoint(tmp_path / "wae.ckpt", latent_dim=6)


def test_batch_of_the_wrong_shape_is_a_clear_error():
    model = WAE(data_shape=(1, 8, 8), latent_dim=4, width=8)
    with pytest.raises(ValueError, match=r"built for data of shape \(1, 8, 8\).*\(5, 3, 32, 32\)"):
        model.training_step((torch.randn(5, 3, 32, 32), torch.zeros(5)), 0)


@pytest.mark.parametrize(
    "kwargs, listed",
    [
        (dict(latent_penalty="f", divergence="kullback"), "jensen_shannon"),
        (dict(cost="l3"), "l2sq"),
        (dict(prior="laplace"), "sphere"),
        (dict(kernel="poly"), "imq"),
        (dict(latent_penalty="wgan"), "mmd"),
    ],
)
def test_unknown_names_list_the_valid_ones(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        WAE(data_shape=(2,), latent_dim=2, **kwargs)
