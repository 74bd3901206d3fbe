"""The hybrid primal-dual model: alpha = 1 is the f-WAE and alpha = 0 the Lipschitz f-GAN (same losses,
gradients and parameter updates), the duality gap closes on a 2-D problem with a known value, epoch
aggregates, training on every divergence, checkpoints and bad input."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_modules.autoencoder as autoencoder
from cli.command import cli_main
from datamodules import DigitsDataModule, GaussianMixtureDataModule
from helpers import dual_value, ref_f, reference_dual_value
from lightning_modules.fgan import FGAN
from lightning_modules.primal_dual import MC_SEED, PrimalDual
from lightning_modules.wae import WAE
from maths.dual import is_dual_certified
from maths.gaussian_codes import monte_carlo_divergence
from maths.layers import Squeeze, eval_mode
from transport.costs import METRIC_COSTS, cost

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is about 10x faster on shared cores


def digits_batch(n: int = 16) -> torch.Tensor:
    dm = DigitsDataModule(batch_size=n)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    return x.double()


def fix_latent_draws(model: nn.Module, z0: torch.Tensor) -> None:
    """Every prior draw of `model` returns the first rows of z0, whoever asks and in whatever order."""
    model.sample_latent = lambda n, generator=None: z0[:n]


def one_training_step(quiet_trainer, model: L.LightningModule, x: torch.Tensor, z0: torch.Tensor) -> None:
    """One training_step on the batch x in float64, with fixed prior draws and a fixed seed."""
    fix_latent_draws(model, z0)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=len(x))
    torch.manual_seed(0)  # the same encoder noise for both models
    quiet_trainer(max_epochs=1, limit_val_batches=0, precision="64-true").fit(model, train_dataloaders=loader)


def copy_weights(source: nn.Module, target: PrimalDual, only_missing: str) -> None:
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and missing and all(k.split(".")[0] in only_missing.split() for k in missing)


def assert_same_parameters(a: nn.Module, b: nn.Module, prefixes: tuple[str, ...]) -> None:
    params_b = dict(b.named_parameters())
    checked = 0
    for name, value in a.named_parameters():
        if name.startswith(prefixes):
            assert torch.equal(value, params_b[name]), name
            checked += 1
    assert checked > 0


# ---- alpha = 1 is the f-WAE --------------------------------------------------------------------


@pytest.mark.parametrize("encoder_type, divergence", [("deterministic", "jensen_shannon"), ("gaussian", "kl")])
def test_alpha_one_is_exactly_the_f_wae(encoder_type, divergence, quiet_trainer):
    common = dict(data_shape=(1, 8, 8), latent_dim=4, divergence=divergence, lambda_=2.5, cost="l2",
                  encoder_type=encoder_type, width=8, n_critic=2, lr=1e-3, betas=(0.5, 0.99))
    wae = WAE(latent_penalty="f", critic_width=16, critic_depth=2, critic_lr=3e-3, **common).double()
    model = PrimalDual(alpha=1.0, latent_critic_width=16, latent_critic_depth=2, latent_critic_lr=3e-3,
                       critic_width=8, **common).double()
    copy_weights(wae, model, only_missing="critic")
    x = digits_batch()
    z0 = torch.randn(16, 4, dtype=torch.float64)

    # The losses and their gradients, on a fixed batch with fixed draws.
    for m in (wae, model):
        fix_latent_draws(m, z0)
    torch.manual_seed(1)
    z_wae = wae.encode(x)
    torch.manual_seed(1)
    z = model.encode(x)
    assert torch.equal(z_wae, z)
    recon_wae = wae.reconstruction_cost(x, wae.decode(z_wae))
    penalty_wae, penalty_loss_wae = wae.latent_penalty(z_wae)
    loss_wae = recon_wae + wae.hparams.lambda_ * penalty_loss_wae  # WAE.training_step's loss
    primal, recon, penalty = model.primal_loss(x, z, z0)
    loss = model.combined_generator_loss(primal, None)
    assert torch.equal(loss, loss_wae) and torch.equal(recon, recon_wae) and torch.equal(penalty, penalty_wae)
    loss_wae.backward()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, p in wae.named_parameters():
        if name.startswith(("encoder", "decoder")):
            assert torch.equal(p.grad, grads[name]), name
    latent_objective_wae = wae.divergence.variational_estimate(wae.latent_critic.output(z_wae), wae.latent_critic.output(z0))
    assert torch.equal(model.latent_critic.objective(z, z0), latent_objective_wae)  # WAE's latent critic step's objective

    # A whole training step (n_critic latent critic steps, then the autoencoder step): same updates.
    for m in (wae, model):
        m.zero_grad()
    before = {n: p.detach().clone() for n, p in wae.named_parameters()}
    one_training_step(quiet_trainer, wae, x, z0)
    one_training_step(quiet_trainer, model, x, z0)
    assert_same_parameters(wae, model, ("encoder", "decoder", "latent_critic"))
    assert not torch.equal(before["encoder.head.weight"], dict(wae.named_parameters())["encoder.head.weight"])


# ---- alpha = 0 is the Lipschitz f-GAN ----------------------------------------------------------


@pytest.mark.parametrize("generator_loss, divergence, critic_activation",
                         [("saturating", "kl", "leaky_relu"), ("non_saturating", "gan", "leaky_relu"),
                          ("saturating", "kl", "maxmin")])
def test_alpha_zero_is_exactly_the_lipschitz_fgan(generator_loss, divergence, critic_activation, quiet_trainer):
    common = dict(data_shape=(1, 8, 8), latent_dim=4, divergence=divergence, generator_loss=generator_loss,
                  width=8, critic_width=8, critic_depth=2, critic_activation=critic_activation, n_critic=2, lr=1e-3, critic_lr=3e-3, betas=(0.5, 0.99))
    fgan = FGAN(lipschitz="spectral_norm", lambda_scale=2.5, **common).double()
    model = PrimalDual(alpha=0.0, lambda_=2.5, latent_critic_width=8, **common).double()
    copy_weights(fgan, model, only_missing="encoder latent_critic")
    x = digits_batch()
    z0 = torch.randn(16, 4, dtype=torch.float64)

    fake_fgan, fake = fgan.decode(z0), model.decode(z0)
    assert torch.equal(fake_fgan, fake)
    loss_fgan, objective_fgan, _ = fgan.critic.loss(x, fake_fgan.detach())
    loss_critic, objective, _ = model.critic.loss(x, fake.detach())
    assert torch.equal(loss_critic, loss_fgan) and torch.equal(objective, objective_fgan)
    generator_fgan = fgan.generator_loss(fake_fgan)
    primal, _, _ = model.primal_loss(x, model.encode(x), z0)
    generator = model.combined_generator_loss(primal, model.critic.generator_loss(fake, generator_loss))
    assert torch.equal(generator, generator_fgan)
    (loss_fgan + generator_fgan).backward()
    (loss_critic + generator).backward()
    grads = dict(model.named_parameters())
    for name, p in fgan.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    assert all(p.grad is None for p in model.encoder.parameters())  # alpha = 0: the primal is not in G's loss
    assert dual_value(model.critic, x, fake) == dual_value(fgan.critic, x, fake_fgan)
    assert model.critic.lipschitz_bound() == fgan.critic.lipschitz_bound()

    for m in (fgan, model):
        m.zero_grad()
    one_training_step(quiet_trainer, fgan, x, z0)
    one_training_step(quiet_trainer, model, x, z0)
    assert_same_parameters(fgan, model, ("decoder", "critic"))


def test_generator_follows_the_mixture_and_the_encoder_the_primal():
    """0 < alpha < 1: dG = alpha dG(primal) + (1 - alpha) dG(dual generator loss), dE = dE(primal)."""
    alpha = 0.3
    model = PrimalDual(data_shape=(2,), latent_dim=2, alpha=alpha, divergence="pearson", width=8, critic_width=8,
                       latent_critic_width=8).double()
    model.critic.eval()  # spectral norm's power iteration would move between the three evaluations
    model.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)  # no trainer here
    x, z, z_fake = (torch.randn(32, 2, dtype=torch.float64) for _ in range(3))

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    primal_grads = grads(lambda: model.primal_loss(x, model.encode(x), z)[0])
    dual_grads = grads(lambda: model.critic.generator_loss(model.decode(z_fake), model.hparams.generator_loss))
    model.zero_grad()
    model._backward_encoder_generator(model.primal_loss(x, model.encode(x), z)[0],
                                      model.critic.generator_loss(model.decode(z_fake), model.hparams.generator_loss))
    for name, p in model.named_parameters():
        if name.startswith("encoder"):
            torch.testing.assert_close(p.grad, primal_grads[name], rtol=1e-12, atol=0)
        elif name.startswith("decoder"):
            torch.testing.assert_close(p.grad, alpha * primal_grads[name] + (1 - alpha) * dual_grads[name])


# ---- the duality gap on a problem with a known value -------------------------------------------


class Identity(nn.Module):
    """G(z) = z: injective, frozen (no parameters)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class RecordWithErrors(L.Callback):
    """After each validation epoch: the logged primal, dual and gap, and the standard error of
    primal - dual, from the per-sample terms of the same estimators on the held-out set."""

    def __init__(self, val_x: torch.Tensor) -> None:
        self.val_x = val_x
        self.rows: list[dict[str, float]] = []

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: PrimalDual) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: trainer.callback_metrics[f"val/{k}"].item() for k in
                   ("primal", "dual", "gap", "recon", "latent_divergence_critic", "dual_lower_bound")}
        x, lam = self.val_x, pl_module.hparams.lambda_
        with eval_mode(pl_module):
            z = pl_module.encode(x)
            primal_terms = cost(x, pl_module.decode(z), "l2") + lam * pl_module.latent_divergence.activation(
                pl_module.latent_critic.output(z))
            prior_terms = lam * pl_module.latent_divergence.conjugate_of_activation(
                pl_module.latent_critic.output(torch.randn_like(z)))
            real_terms = pl_module.critic.value(x)
            fake_terms = pl_module.data_divergence.conjugate_of_activation(pl_module.critic.output(pl_module.sample(len(x))))
        variance = sum(t.var() for t in (primal_terms, prior_terms, real_terms, fake_terms))
        metrics["std_error"] = math.sqrt(variance / len(x))
        self.rows.append(metrics)


def test_duality_gap_closes_on_a_gaussian_shift_with_a_known_value(quiet_trainer):
    """P_X = N(m, I_2), G(z) = z frozen (P_G = N(0, I_2)), c = l2, kl, lambda = 2, ||m|| = 2.

    Primal: E(x) = x - t m/||m|| gives recon t and D_kl(N((2 - t) u, I) || N(0, I)) = (2 - t)^2 / 2,
    minimised at 2 - t = 1/lambda: primal = ||m|| - 1/(2 lambda) = 1.75. Dual: h(x) = <x, u> + c in
    H_c gives ||m|| + c - lambda exp(c/lambda - 1 + 1/(2 lambda^2)), maximised at c = lambda - 1/(2 lambda):
    dual = ||m|| - 1/(2 lambda) = 1.75. Equal, as the theorem says for an injective G. Training E and
    both critics must bring both estimates there, with dual <= primal up to estimation error throughout.

    The encoder is affine (the optimum is affine) and starts at the identity: a deterministic encoder
    that reverses orientation (det A < 0, half of all random starts) cannot reach the optimum, since
    on the way det A = 0 and D_kl(Q_Z || P_Z) is infinite; it stays at primal ~2.5. The critics are
    the module's own networks.
    """
    lam, target = 2.0, 2.0 - 1.0 / (2 * 2.0)
    torch.manual_seed(0)
    m = torch.tensor([1.2, 1.6])  # ||m|| = 2
    train_x, val_x = torch.randn(4096, 2) + m, torch.randn(4096, 2) + m
    encoder = nn.Linear(2, 2)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(2))
        encoder.bias.zero_()
    model = PrimalDual(data_shape=(2,), latent_dim=2, divergence="kl", lambda_=lam, alpha=1.0, cost="l2",
                       critic_width=32, critic_depth=2, latent_critic_width=64, latent_critic_depth=2,
                       n_critic=5, lr=1e-2, critic_lr=5e-3, latent_critic_lr=5e-3, encoder=encoder, decoder=Identity())
    record = RecordWithErrors(val_x)
    trainer = quiet_trainer(max_epochs=20, num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(model, DataLoader(TensorDataset(train_x), batch_size=256, shuffle=True),
                DataLoader(TensorDataset(val_x), batch_size=1024))

    print(f"\ntarget GAN_{{lambda f}} = fWAE = {target}")
    print("epoch  primal    dual     gap   std_error  certified dual")
    for epoch, r in enumerate(record.rows):
        print(f"{epoch:5d}  {r['primal']:.4f}  {r['dual']:.4f}  {r['gap']:+.4f}  {r['std_error']:.4f}  "
              f"{r['dual_lower_bound']:.4f}")
    assert len(record.rows) == 20
    for r in record.rows:
        # 4 standard errors: 20 epochs are 20 comparisons (a 3-sigma rule would fail 1 run in 40 by chance).
        assert r["dual"] <= r["primal"] + 4 * r["std_error"]
        assert r["dual_lower_bound"] <= m.norm().item() + 4 * r["std_error"]  # certified: <= W_c(P_X, P_G)
    final = record.rows[-1]
    assert final["gap"] < 0.1 * final["primal"]
    assert abs(final["dual"] - target) < 0.1 and abs(final["primal"] - target) < 0.15


# ---- what validation logs ----------------------------------------------------------------------


@pytest.mark.parametrize("encoder_type", ["deterministic", "gaussian"])
def test_validation_values_are_epoch_aggregates(encoder_type, monkeypatch, quiet_trainer):
    """Two validation batches of unequal size (64 + 36): every logged value is the one of the whole
    held-out set, not the average of the two batch values."""

    torch.manual_seed(0)
    val_x = torch.randn(100, 2, dtype=torch.float64)
    z0 = torch.randn(64, 2, dtype=torch.float64)
    model = PrimalDual(data_shape=(2,), latent_dim=2, divergence="kl", lambda_=1.5, encoder_type=encoder_type,
                       width=8, critic_width=8, mc_samples=500, latent_critic=nn.Sequential(nn.Linear(2, 1), Squeeze())).double()
    fix_latent_draws(model, z0)  # batch b's fakes and prior draws are G(z0[:B_b]) and z0[:B_b]
    shift = torch.tensor([2.0, 0.0], dtype=torch.float64)
    with torch.no_grad():  # codes near N(shift, .) and T near the optimal kl critic: a clearly positive estimate
        model.encoder[-1].bias[:2] += shift
        model.latent_critic.network[0].weight.copy_(shift[None])
        model.latent_critic.network[0].bias.fill_(-shift.pow(2).sum() / 2)  # + the kl offset 1 the model adds
    codes = []  # the Gaussian encoder's draws, as validation made them
    draw = autoencoder.reparameterize
    monkeypatch.setattr(autoencoder, "reparameterize", lambda m, v: codes.append(draw(m, v)) or codes[-1])
    (logged,) = quiet_trainer(precision="64-true").validate(
        model, DataLoader(TensorDataset(val_x), batch_size=64), verbose=False)

    z0s = torch.cat([z0[:64], z0[:36]])  # the prior draws, batch by batch
    model.eval()
    with torch.no_grad():
        out = model.encoder(val_x)
        mean, log_var = out.chunk(2, dim=1) if encoder_type == "gaussian" else (out, None)
        z = torch.cat(codes) if encoder_type == "gaussian" else out
        recon = cost(val_x, model.decode(z), "l2").mean()
        latent = (model.latent_divergence.activation(model.latent_critic.output(z)).mean()
                  - model.latent_divergence.conjugate_of_activation(model.latent_critic.output(z0s)).mean())
        dual = (model.critic.value(val_x).mean()
                - model.data_divergence.conjugate_of_activation(model.critic.output(model.decode(z0s))).mean())
    assert latent > 0.5  # the clamp at f(1) = 0 (tested below) is not what is compared here
    assert logged["val/recon"] == pytest.approx(recon.item(), rel=1e-6)
    assert logged["val/latent_divergence_critic"] == pytest.approx(latent.item(), rel=1e-6, abs=1e-9)
    assert logged["val/dual"] == pytest.approx(dual.item(), rel=1e-6, abs=1e-9)
    assert logged["val/primal"] == pytest.approx(recon.item() + 1.5 * latent.item(), rel=1e-6)
    assert logged["val/lipschitz_bound"] == pytest.approx(model.critic.lipschitz_bound(), rel=1e-6)
    assert logged["val/dual_certified"] == float(is_dual_certified(model.data_divergence, model.critic.network_bound()))
    if encoder_type == "gaussian":  # the mixture over all 100 validation codes
        mc = monte_carlo_divergence("kl", mean, log_var.clamp(-10, 5), 500,
                                    generator=torch.Generator().manual_seed(MC_SEED))
        assert logged["val/latent_divergence_mc"] == pytest.approx(mc.value.item(), rel=1e-6)
        assert logged["val/latent_divergence_mc_std_error"] == pytest.approx(mc.std_error.item(), rel=1e-6)
    else:
        assert "val/latent_divergence_mc" not in logged


# ---- the logged primal, dual and gap against an independent computation ------------------------

def _reference_tanh_mlp(weights: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    """r(x) = w2 . tanh(W1 x + b1) + b2, (N, d) -> (N,)."""
    w1, b1, w2, b2 = weights
    return np.tanh(x @ w1.T + b1) @ w2 + b2


def _tanh_mlp(weights: tuple[np.ndarray, ...]) -> nn.Module:
    """The module of `_reference_tanh_mlp`: (B, d) -> (B,)."""
    w1, b1, w2, b2 = (torch.from_numpy(np.atleast_1d(w)) for w in weights)
    first, last = nn.Linear(w1.shape[1], w1.shape[0], dtype=torch.float64), nn.Linear(w1.shape[0], 1, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(w1), first.bias.copy_(b1), last.weight.copy_(w2[None]), last.bias.copy_(b2)
    return nn.Sequential(first, nn.Tanh(), last, Squeeze())


def _affine(matrix: np.ndarray, shift: np.ndarray) -> nn.Module:
    """x -> matrix x + shift."""
    layer = nn.Linear(matrix.shape[1], matrix.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(matrix)), layer.bias.copy_(torch.from_numpy(shift))
    return layer


@pytest.mark.parametrize("divergence, lam", [("kl", 1.5), ("jensen_shannon", 2.0)])
def test_logged_primal_dual_and_gap_match_an_independent_computation(divergence, lam, quiet_trainer):
    """A PrimalDual with fixed networks (affine encoder and decoder, tanh critics: no training), 40
    held-out points in batches of 24 and 16, fixed prior draws: val/recon, val/latent_divergence_critic,
    val/primal, val/dual, val/gap, val/lipschitz_bound and val/dual_lower_bound recomputed in numpy
    from the weights and the table of docs/theory.md, each side on its own:

        primal = mean ||x - G(E(x))|| + lambda max(E_{Q_Z}[g_f(v_T)] - E_{P_Z}[f*(g_f(v_T))], f(1)),
        dual   = E_{P_X}[h] - E_{P_G}[(lambda f)*(h)],   gap = primal - dual,

    with v = r + v0 for every critic (tests/helpers.py writes the rows out), and the certified dual
    the dual of r / max(1, ||W1|| ||w2||)."""
    rng = np.random.default_rng(3)
    encoder = (np.eye(2) + 0.3 * rng.normal(size=(2, 2)), np.array([1.5, 0.0]))  # codes off the prior
    decoder = (rng.normal(size=(2, 2)), rng.normal(size=2))
    # a latent critic that tells them apart (T grows with z_1): D_f(Q_Z || P_Z) estimated above f(1)
    latent_critic = (np.array([[0.5, 0.0], [0.0, 0.5], [0.3, 0.3]]), 0.1 * rng.normal(size=3),
                     np.array([2.0, 0.3, -0.2]), -0.5)
    critic = (2.0 * rng.normal(size=(4, 2)), rng.normal(size=4), rng.normal(size=4), rng.normal())  # Lipschitz > 1
    val_x = rng.normal(size=(40, 2)) + np.array([1.0, 0.0])
    z0 = rng.normal(size=(24, 2))  # batch b's prior draws and fakes' codes: z0[:B_b]

    model = PrimalDual(data_shape=(2,), latent_dim=2, divergence=divergence, lambda_=lam, cost="l2",
                       encoder=_affine(*encoder), decoder=_affine(*decoder), critic=_tanh_mlp(critic),
                       latent_critic=_tanh_mlp(latent_critic))
    fix_latent_draws(model, torch.from_numpy(z0))
    loader = DataLoader(TensorDataset(torch.from_numpy(val_x)), batch_size=24)
    (logged,) = quiet_trainer(precision="64-true").validate(model, loader, verbose=False)

    codes = val_x @ encoder[0].T + encoder[1]
    prior = np.concatenate([z0[:24], z0[:16]])  # as the batches drew them
    fakes = prior @ decoder[0].T + decoder[1]
    recon = np.linalg.norm(val_x - (codes @ decoder[0].T + decoder[1]), axis=1).mean()
    latent = reference_dual_value(divergence, 1.0, _reference_tanh_mlp(latent_critic, codes),
                                   _reference_tanh_mlp(latent_critic, prior))
    f_at_one = float(ref_f(divergence, 1.0))
    primal = recon + lam * max(latent, f_at_one)
    raw_real, raw_fake = _reference_tanh_mlp(critic, val_x), _reference_tanh_mlp(critic, fakes)
    dual = reference_dual_value(divergence, lam, raw_real, raw_fake)
    bound = np.linalg.norm(critic[0], 2) * np.linalg.norm(critic[2])  # tanh and g_f are 1-Lipschitz here
    certified = reference_dual_value(divergence, lam, raw_real / max(1.0, bound), raw_fake / max(1.0, bound))
    assert latent > f_at_one + 0.05 and bound > 1.5 and abs(primal - dual) > 0.1  # nothing compared is degenerate
    expected = {"val/recon": recon, "val/latent_divergence_critic": latent, "val/primal": primal, "val/dual": dual,
                "val/gap": primal - dual, "val/lipschitz_bound": bound, "val/dual_lower_bound": certified}
    for key, value in expected.items():  # float64 throughout; the bound is a Python float, logged in float32
        assert logged[key] == pytest.approx(value, rel=1e-6 if key == "val/lipschitz_bound" else 1e-9), key
    assert logged["val/dual_certified"] == 0.0  # bound > 1


def test_a_latent_critic_worse_than_a_constant_gives_way_to_f_at_one(quiet_trainer):
    """D_f >= f(1), and the constant critic f'(1) attains f(1): a worse T is not reported below it."""
    for divergence, f_at_one in (("kl", 0.0), ("gan", -math.log(4))):
        model = PrimalDual(data_shape=(2,), latent_dim=2, divergence=divergence, width=8, critic_width=8,
                           latent_critic_width=8)
        with torch.no_grad():
            model.latent_critic.network[0][-1].bias.fill_(-5.0 if divergence == "kl" else 5.0)  # far from f'(1)
        (logged,) = quiet_trainer().validate(model, DataLoader(TensorDataset(torch.randn(64, 2))), verbose=False)
        assert logged["val/latent_divergence_critic"] == pytest.approx(f_at_one)
        assert logged["val/primal"] == pytest.approx(logged["val/recon"] + f_at_one, rel=1e-6)


def test_monte_carlo_primal_estimator_is_used_and_announced(caplog, quiet_trainer):
    dm = GaussianMixtureDataModule(num_samples=256, num_val_samples=200, num_test_samples=10, batch_size=128)
    model = PrimalDual(data_shape=(2,), latent_dim=2, encoder_type="gaussian", primal_estimator="monte_carlo",
                       lambda_=3.0, width=8, critic_width=8, latent_critic_width=8, mc_samples=256)
    with caplog.at_level("INFO"):
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1)
        trainer.fit(model, datamodule=dm)
    assert "Monte Carlo" in caplog.text and "val/latent_divergence_mc" in caplog.text
    m = trainer.callback_metrics
    expected = m["val/recon"] + 3.0 * m["val/latent_divergence_mc"]
    assert m["val/primal"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["val/primal"].item() != pytest.approx((m["val/recon"] + 3.0 * m["val/latent_divergence_critic"]).item())


# ---- training runs, checkpoints, bad input -----------------------------------------------------


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "pearson", "hellinger", "jensen_shannon", "gan",
                                        "total_variation", "neyman"])
@pytest.mark.parametrize("encoder_type", ["deterministic", "gaussian"])
def test_one_batch_of_digits_for_every_divergence_and_encoder(divergence, encoder_type, quiet_trainer):
    model = PrimalDual(data_shape=(1, 8, 8), divergence=divergence, encoder_type=encoder_type, width=8,
                       critic_width=8, latent_critic_width=16, mc_samples=256)
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    m = trainer.callback_metrics
    for key in ("train/primal", "train/critic_objective", "val/primal", "val/dual", "val/gap"):
        assert torch.isfinite(m[key]), key
    # reverse_kl, neyman, hellinger: g_f has an unbounded slope, so no finite certificate exists.
    assert math.isfinite(m["val/lipschitz_bound"].item()) == model.data_divergence.is_activation_1_lipschitz
    assert ("val/latent_divergence_mc" in m) == (encoder_type == "gaussian")
    assert ("val/dual_lower_bound" in m) == model.data_divergence.is_activation_1_lipschitz


@pytest.mark.parametrize("lipschitz", ["gradient_penalty", "none"])
def test_other_critic_classes_train_and_still_log_a_certificate(lipschitz, quiet_trainer):
    dm = GaussianMixtureDataModule(num_samples=256, num_val_samples=128, num_test_samples=10, batch_size=128)
    model = PrimalDual(data_shape=(2,), latent_dim=2, lipschitz=lipschitz, width=8, critic_width=8,
                       latent_critic_width=8)
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, datamodule=dm)
    assert math.isfinite(trainer.callback_metrics["val/lipschitz_bound"].item())
    assert ("train/gradient_norm" in trainer.callback_metrics) == (lipschitz == "gradient_penalty")


@pytest.mark.parametrize("config", ["primal_dual_digits.yaml", "primal_dual_gaussians.yaml"])
@pytest.mark.usefixtures("in_tmp_dir")  # the configs write runs/ below the working directory
def test_configs_run_from_the_command_line(config):
    path = Path(__file__).resolve().parents[1] / "configs" / config
    cli = cli_main(["fit", "--config", str(path), "--trainer.fast_dev_run", "true",
                    "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.model, PrimalDual) and cli.model.hparams.cost == "l2"
    assert torch.isfinite(cli.trainer.callback_metrics["val/gap"])


def test_checkpoint_round_trip(checkpoint_round_trip):
    model = PrimalDual(data_shape=(1, 8, 8), divergence="pearson", encoder_type="gaussian", alpha=0.25, width=8,
                       critic_width=8, latent_critic_width=16, mc_samples=128)
    loaded = checkpoint_round_trip(model)
    assert loaded.hparams.alpha == 0.25 and loaded.hparams.divergence == "pearson"
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded.encode_parameters(x), model.encode_parameters(x))
    torch.testing.assert_close(dual_value(loaded.critic, x, x.flip(0)), dual_value(model.critic, x, x.flip(0)))
    assert loaded.critic.lipschitz_bound() == pytest.approx(model.critic.lipschitz_bound(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, listed",
    [
        (dict(divergence="wasserstein"), "total_variation"),
        (dict(cost="l3"), "l2sq"),
        (dict(prior="laplace"), "sphere"),
        (dict(encoder_type="vae"), "deterministic, gaussian"),
        (dict(primal_estimator="exact"), "critic, monte_carlo"),
        (dict(generator_loss="minimax"), "saturating, non_saturating"),
        (dict(lipschitz="clip"), "spectral_norm, gradient_penalty, none"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
        (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
        (dict(alpha=float("nan")), r"alpha must be in \[0, 1\]"),
        (dict(lambda_=0.0), "lambda_ must be a positive"),
        (dict(n_critic=0), "n_critic >= 1"),
        (dict(primal_estimator="monte_carlo"), "needs encoder_type='gaussian'"),
        (dict(primal_estimator="monte_carlo", encoder_type="gaussian", prior="sphere"), "Lebesgue"),
        (dict(primal_estimator="monte_carlo", encoder_type="gaussian", prior="cube"), r"\[-1, 1\]\^d"),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        PrimalDual(data_shape=(2,), latent_dim=2, **kwargs)


def test_a_cost_that_is_not_a_metric_is_allowed_but_never_certified():
    with pytest.warns(UserWarning, match="not a metric"):
        model = PrimalDual(data_shape=(2,), latent_dim=2, cost="l2sq", divergence="kl")
    def certified(model: PrimalDual) -> bool:  # as validation decides, for a network bound of 0.5
        return is_dual_certified(model.data_divergence, 0.5, model.hparams.cost in METRIC_COSTS)

    assert not certified(model)
    assert certified(PrimalDual(data_shape=(2,), latent_dim=2, cost="l1", divergence="kl"))
    assert not certified(PrimalDual(data_shape=(2,), latent_dim=2, divergence="hellinger"))


def test_batch_of_the_wrong_shape_is_a_clear_error():
    model = PrimalDual(data_shape=(1, 8, 8), latent_dim=4, width=8, critic_width=8)
    with pytest.raises(ValueError, match=r"built for data of shape \(1, 8, 8\)"):
        model.training_step((torch.randn(5, 3, 32, 32), torch.zeros(5)), 0)


def test_monte_carlo_training_estimator_keeps_the_critic_free_primal_honest(quiet_trainer):
    """Trained on the latent critic's (lower, exploitable) estimate, the encoder shrinks its variances
    and the critic-free D_f of its codes is large; trained on the batch mixture's Monte Carlo
    estimate (no adversary) the same model keeps D_f small, so recon + lambda D_f stays low."""
    logged = {}
    for estimator in ("critic", "monte_carlo"):
        L.seed_everything(0, verbose=False)
        dm = GaussianMixtureDataModule(num_samples=1024, num_val_samples=512, num_test_samples=10, batch_size=128)
        model = PrimalDual(data_shape=(2,), latent_dim=2, divergence="kl", lambda_=10.0, alpha=1.0,
                           encoder_type="gaussian", primal_estimator="monte_carlo", training_estimator=estimator,
                           width=32, critic_width=16, latent_critic_width=32, mc_samples=1024)
        trainer = quiet_trainer(max_epochs=30)
        trainer.fit(model, datamodule=dm)
        logged[estimator] = {k: v.item() for k, v in trainer.callback_metrics.items()}
        assert f"train/latent_divergence_{estimator}_epoch" in logged[estimator]
    critic, mc = logged["critic"], logged["monte_carlo"]
    print({k: (round(critic[k], 4), round(mc[k], 4)) for k in ("val/recon", "val/latent_divergence_mc", "val/primal")})
    assert mc["val/latent_divergence_mc"] < 0.1 * critic["val/latent_divergence_mc"]
    assert mc["val/primal"] < critic["val/primal"]


def test_monte_carlo_training_estimator_needs_a_gaussian_encoder_and_prior():
    with pytest.raises(ValueError, match="training_estimator='monte_carlo' needs encoder_type='gaussian'"):
        PrimalDual(data_shape=(2,), latent_dim=2, training_estimator="monte_carlo")
    with pytest.raises(ValueError, match="sphere"):
        PrimalDual(data_shape=(2,), latent_dim=2, encoder_type="gaussian", prior="sphere",
                   training_estimator="monte_carlo")
    with pytest.raises(ValueError, match="training_estimator.*critic.*monte_carlo"):
        PrimalDual(data_shape=(2,), latent_dim=2, training_estimator="mc")
