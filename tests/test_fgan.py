"""The f-GAN: critic objectives against closed-form divergences, generator losses, Lipschitz
critics and their certificates, the dual value against exact optimal transport, and training."""

import math

import lightning as L
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from datamodules import DigitsDataModule, GaussianMixtureDataModule
from helpers import REFERENCE_F, dual_value
from lightning_modules import DIVERGENCE_NAMES, FGAN
from maths.dual import gradient_penalty, is_dual_certified
from maths.lipschitz import empirical_lipschitz

ot = pytest.importorskip("ot")
pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster on shared cores


# ---- the critic objective reaches D_f(P || Q) for two known distributions ----------------------

# P = N(0, 1) (data), Q = N(mu, 1) (frozen generator); mu per row keeps the estimator's variance low.
SHIFTS = {"kl": 1.0, "reverse_kl": 1.0, "pearson": 0.7, "neyman": 0.7, "hellinger": 1.5,
          "jensen_shannon": 1.5, "gan": 1.5, "total_variation": 1.5}


def closed_form(name: str, mu: float) -> float | None:
    """D_f(N(0,1) || N(mu,1)) where a closed form exists (with the registry's conventions)."""
    forms = {
        "kl": mu**2 / 2,
        "reverse_kl": mu**2 / 2,
        "pearson": math.exp(mu**2) - 1,
        "neyman": math.exp(mu**2) - 1,
        "hellinger": 2 * (1 - math.exp(-(mu**2) / 8)),
        "total_variation": 2 * stats.norm.cdf(mu / 2) - 1,
    }
    return forms.get(name)


def _reference_divergence(name: str, mu: float) -> float:
    """Numerical integral of q f(p / q) with f written independently of the registry."""
    f = REFERENCE_F[name]
    p, q = stats.norm(0, 1).pdf, stats.norm(mu, 1).pdf
    value, _ = integrate.quad(lambda x: q(x) * f(p(x) / q(x)), -12 + mu / 2, 12 + mu / 2, limit=200)
    return value


class Shift(nn.Module):
    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = mu

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.mu


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_trained_critic_reaches_the_divergence(name):
    mu = SHIFTS[name]
    reference = _reference_divergence(name, mu)
    if closed_form(name, mu) is not None:
        assert reference == pytest.approx(closed_form(name, mu), rel=1e-6)
    torch.manual_seed(0)
    model = FGAN(data_shape=(1,), latent_dim=1, divergence=name, critic_width=64, critic_depth=2,
                 generator=Shift(mu))  # the generator frozen at N(mu, 1)
    optimizer = torch.optim.Adam(model.critic.parameters(), lr=3e-3)
    for _ in range(800):
        real, fake = torch.randn(1000, 1), model.decode(torch.randn(1000, 1))
        loss, _, _ = model.critic.loss(real, fake)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    estimate = dual_value(model.critic, torch.randn(200_000, 1), mu + torch.randn(200_000, 1)).item()
    print(f"{name}: critic objective {estimate:.4f}, D_f = {reference:.4f}")
    assert abs(estimate - reference) <= 0.1 * abs(reference)


# ---- generator losses and the gradient penalty -------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_untrained_critic_starts_at_the_optimal_constant(name):
    """A critic network that outputs 0 is the optimal constant critic lambda f'(1) for P = Q, whose
    objective is D_{lambda f}(P || P) = lambda f(1) (0 for all rows but gan); without the kl offset
    it would be -lambda / e."""
    lam = 100.0
    model = FGAN(data_shape=(2,), latent_dim=2, divergence=name, lambda_scale=lam).double()
    with torch.no_grad():
        for p in model.critic.parameters():
            p.zero_()
    x = torch.randn(64, 2, dtype=torch.float64)
    expected = lam * (-math.log(4.0) if name == "gan" else 0.0)
    assert dual_value(model.critic, x, x).item() == pytest.approx(expected, abs=1e-9)
    if model.divergence.is_activation_1_lipschitz:  # rescaling the network leaves the offset alone
        assert model.critic.certified_value(x, x, network_bound=3.0).item() == pytest.approx(expected, abs=1e-9)


def test_generator_losses_for_the_gan_row():
    """Non-saturating: E softplus(-v) = -E log D; saturating: -E softplus(v) = E log(1 - D)."""
    model = FGAN(data_shape=(2,), latent_dim=2, divergence="gan")
    fake = torch.randn(64, 2, dtype=torch.float64)
    model.double()
    v = model.critic(fake)
    torch.testing.assert_close(model.generator_loss(fake), torch.nn.functional.softplus(-v).mean())
    model.hparams.generator_loss = "saturating"
    torch.testing.assert_close(model.generator_loss(fake), -torch.nn.functional.softplus(v).mean())


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    w = torch.tensor([3.0, -4.0], dtype=torch.float64)  # ||w|| = 5
    penalty, norm = gradient_penalty(lambda x: x @ w, torch.randn(16, 2, dtype=torch.float64),
                                     torch.randn(16, 2, dtype=torch.float64))
    assert penalty.item() == pytest.approx(16.0) and norm.item() == pytest.approx(5.0)


# ---- Lipschitz critics -------------------------------------------------------------------------


def train_briefly(quiet_trainer, model: FGAN, datamodule, epochs: int = 2) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=2)
    trainer.fit(model, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize("data", ["ring", "digits"])
def test_spectral_norm_critic_is_certified_and_bounds_the_measured_constant(data, quiet_trainer):
    L.seed_everything(0)
    if data == "ring":
        dm = GaussianMixtureDataModule(num_samples=2048, num_val_samples=512, batch_size=256)
        model = FGAN(data_shape=dm.dims, latent_dim=4, lipschitz="spectral_norm", critic_width=64)
    else:
        dm = DigitsDataModule(batch_size=64)
        model = FGAN(data_shape=dm.dims, latent_dim=8, lipschitz="spectral_norm", width=16, critic_width=16)
    trainer = train_briefly(quiet_trainer, model, dm)
    bound = model.critic.lipschitz_bound()
    real = torch.cat([x for x, _ in dm.val_dataloader()])
    fake = model.sample(real.shape[0])
    measured = max(empirical_lipschitz(model.critic.value, real, fake).item(),
                   empirical_lipschitz(model.critic.value, real, real.roll(1, 0)).item())
    print(f"{data}: measured Lipschitz constant {measured:.4f} <= certified bound {bound:.4f}")
    assert measured <= bound <= 1.05
    assert trainer.callback_metrics["val/lipschitz_bound"].item() == pytest.approx(bound, rel=1e-3)


def test_gradient_penalty_drives_gradient_norms_towards_one(quiet_trainer):
    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=4096, num_val_samples=256, batch_size=256)
    model = FGAN(data_shape=dm.dims, latent_dim=4, divergence="kl", lipschitz="gradient_penalty",
                 critic_lr=1e-3, n_critic=3)
    trainer = train_briefly(quiet_trainer, model, dm, epochs=4)
    grad_norm = trainer.callback_metrics["train/gradient_norm_epoch"].item()
    print(f"mean gradient norm at interpolates: {grad_norm:.3f}")
    assert abs(grad_norm - 1.0) < 0.2


def test_unconstrained_critic_claims_nothing(quiet_trainer):
    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=512, num_val_samples=256, batch_size=256)
    trainer = train_briefly(quiet_trainer, FGAN(data_shape=dm.dims, latent_dim=2), dm, epochs=1)
    assert "val/critic_objective" in trainer.callback_metrics
    assert not any(k in trainer.callback_metrics for k in ("val/dual_certified", "val/lipschitz_bound"))


@pytest.mark.parametrize("name", ["hellinger", "reverse_kl"])
def test_unbounded_activation_slope_is_never_certified(name):
    model = FGAN(data_shape=(2,), latent_dim=2, divergence=name, lipschitz="spectral_norm")
    assert model.critic.lipschitz_bound() == math.inf
    assert not is_dual_certified(model.divergence, model.critic.network_bound())
    assert math.isnan(model.critic.certified_value(torch.randn(8, 2), torch.randn(8, 2)).item())


@pytest.mark.parametrize("name, lambda_scale", [("jensen_shannon", 1.0), ("kl", 0.5), ("total_variation", 4.0)])
def test_certified_dual_value_never_exceeds_exact_transport(name, lambda_scale, quiet_trainer):
    """A critic in H_c gives E_x h - E_y (lambda f)*(h) <= E_x h - E_y h <= W_l2(x, y)."""
    L.seed_everything(1)
    dm = GaussianMixtureDataModule(num_samples=2048, num_val_samples=512, batch_size=256)
    model = FGAN(data_shape=dm.dims, latent_dim=4, divergence=name, lambda_scale=lambda_scale,
                 lipschitz="spectral_norm", critic_lr=2e-3, n_critic=5, lr=0.0)  # critic only: a tight test
    train_briefly(quiet_trainer, model, dm, epochs=6)
    real = torch.cat([x for x, _ in dm.val_dataloader()])[:400].double()
    fake = model.sample(400).double()
    model.double()
    exact = ot.emd2(ot.unif(400), ot.unif(400), ot.dist(real.numpy(), fake.numpy(), metric="euclidean"))
    certified = model.critic.certified_value(real, fake).item()
    print(f"{name} x {lambda_scale}: certified dual {certified:.4f} <= exact W_l2 {exact:.4f}")
    assert certified <= exact + 1e-9
    if is_dual_certified(model.divergence, model.critic.network_bound()):
        assert dual_value(model.critic, real, fake).item() <= exact + 1e-9


# ---- training, checkpoints and bad input -------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_every_divergence_runs_one_batch_on_digits(name, quiet_trainer):
    model = FGAN(data_shape=(1, 8, 8), divergence=name, width=8, critic_width=8, lipschitz="spectral_norm")
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert torch.isfinite(trainer.callback_metrics["train/critic_objective"])


def test_checkpoint_round_trip(checkpoint_round_trip):
    model = FGAN(data_shape=(1, 8, 8), divergence="pearson", width=8, critic_width=8, lipschitz="spectral_norm")
    loaded = checkpoint_round_trip(model)
    assert loaded.hparams.divergence == "pearson"
    assert loaded.critic.lipschitz_bound() == pytest.approx(model.critic.lipschitz_bound(), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, listed",
    [(dict(divergence="wasserstein"), "total_variation"), (dict(lipschitz="clip"), "gradient_penalty"),
     (dict(generator_loss="minimax"), "non_saturating")],
)
def test_unknown_names_list_the_valid_ones(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        FGAN(data_shape=(2,), latent_dim=2, **kwargs)


# ---- the settings of the mode-coverage benchmark (configs/fgan_gaussians.yaml) ------------------


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_every_divergence_runs_on_the_ring_with_a_2d_latent(name, quiet_trainer):
    """The benchmark trains every row with an unconstrained critic on 2-D points (no output
    activation on the generator); a few steps must keep every logged value finite."""
    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=256, num_val_samples=64, batch_size=64)
    model = FGAN(data_shape=dm.dims, latent_dim=2, divergence=name, width=16,
                 critic_width=16, lr=1e-3, critic_lr=1e-3)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(metrics[k]) for k in ("train/critic_objective_epoch", "train/generator_loss_epoch",
                                                    "val/critic_objective"))
    assert torch.isfinite(model.sample(8)).all()


def test_mode_coverage_callback_on_an_fgan(quiet_trainer):
    """ModeCoverageCallback reads the ring from the datamodule and logs what it counted."""
    from callbacks.modes import ModeCoverageCallback

    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=256, num_val_samples=64, batch_size=64)
    model = FGAN(data_shape=dm.dims, latent_dim=2, width=16, critic_width=16)
    callback = ModeCoverageCallback(num_samples=500)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1, callbacks=[callback])
    trainer.fit(model, datamodule=dm)
    assert callback.centers is dm.centers and callback.std == 0.02
    assert trainer.callback_metrics["val/modes_covered"].item() == callback.last.num_covered
    assert trainer.callback_metrics["val/high_quality_fraction"].item() == pytest.approx(
        callback.last.high_quality_fraction, abs=1e-6)
    assert callback.last.fractions.sum().item() == pytest.approx(callback.last.high_quality_fraction)


# ---- a critic that reaches H_c's best: MaxMin ------------------------------------------------------


def _certified_dual_after_critic_training(activation: str, real: torch.Tensor, fake: torch.Tensor) -> float:
    torch.manual_seed(1)
    model = FGAN(data_shape=(2,), latent_dim=2, divergence="kl", lambda_scale=50.0, lipschitz="spectral_norm",
                 critic_activation=activation, critic_width=32)
    optimizer = torch.optim.Adam(model.critic.parameters(), lr=2e-3, betas=(0.5, 0.999))
    for _ in range(800):
        loss = -model.critic.objective(real, fake)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().double()
    with torch.no_grad():
        return model.critic.certified_value(real.double(), fake.double()).item()


def test_maxmin_critic_brings_the_certified_dual_close_to_exact_transport():
    """With the kl row at lambda = 50, (lambda f)*(h) ~ h, so the critic objective ~ E_x h - E_y h,
    whose sup over 1-Lipschitz h is W_l2(x, y) (Kantorovich-Rubinstein). Trained on fixed samples
    (a ring of 8 Gaussians against a wide Gaussian), a spectrally normalised MaxMin critic's
    certified value gets within 25% of POT's exact W_l2 and far above a LeakyReLU critic's
    (measured 0.84 and 0.43 of W: ReLU-type activations shrink gradient norms layer after layer)."""
    generator = torch.Generator().manual_seed(0)
    n = 256
    angles = torch.randint(0, 8, (n,), generator=generator) * (2 * math.pi / 8)
    real = torch.stack([2 * angles.cos(), 2 * angles.sin()], 1) + 0.02 * torch.randn(n, 2, generator=generator)
    fake = 0.7 * torch.randn(n, 2, generator=generator)  # (n, 2) each
    exact = ot.emd2(ot.unif(n), ot.unif(n), ot.dist(real.double().numpy(), fake.double().numpy(), metric="euclidean"))
    maxmin = _certified_dual_after_critic_training("maxmin", real, fake)
    leaky = _certified_dual_after_critic_training("leaky_relu", real, fake)
    print(f"exact W_l2 {exact:.4f}; certified dual: maxmin {maxmin:.4f}, leaky_relu {leaky:.4f}")
    assert max(maxmin, leaky) <= exact + 1e-9
    assert maxmin >= 0.75 * exact
    assert maxmin >= 1.5 * leaky
