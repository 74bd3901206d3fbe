"""The hybrid primal-dual model: an f-WAE and a Lipschitz f-GAN trained together (SPEC section 4).

With c a metric, H_c its 1-Lipschitz functions and lambda > 0 (Husain, Nock, Williamson 2019):

    dual    GAN_{lambda f}(P_X, G; H_c) = sup_{h in H_c} E_{P_X}[h] - E_{P_G}[(lambda f)*(h)]
         <= fWAE_{c,lambda}(P_X, G)     = inf_E  E_{P_X}[c(x, G(E(x)))] + lambda D_f(Q_Z || P_Z)   primal
         <= W_c(P_X, P_G),

with equality in the first line when G is injective and the encoder class is rich. The model
holds four networks: the generator / decoder G, the encoder E, a Lipschitz data critic h (layers
divided by their operator norms by default) and a latent critic T for D_f(Q_Z || P_Z):

- T ascends the variational estimate E_{Q_Z}[g_f(T)] - E_{P_Z}[f*(g_f(T))] of D_f(Q_Z || P_Z);
- h = lambda g_f(v / lambda) ascends the dual value E_{P_X}[h] - E_{P_G}[(lambda f)*(h)];
- E descends the primal loss  E c(x, G(E(x))) + lambda * (T's estimate)  (the primal is an inf over E);
  with `training_estimator="monte_carlo"` (Gaussian encoder) the critic-free estimate for the batch's
  Gaussian mixture replaces T's in this loss;
- G descends  alpha * primal + (1 - alpha) * (generator side of the dual), the latter
  -E_{P_G}[(lambda f)*(h)] (`saturating`, the dual value's G-dependent term) or -E_{P_G}[h]
  (`non_saturating`). alpha = 1 is the f-WAE (`WAE(latent_penalty="f")`), alpha = 0 the Lipschitz
  f-GAN (`FGAN(lipschitz="spectral_norm", lambda_scale=lambda_)`): same losses, same gradients.

Logged at every validation epoch (`primal_dual_evaluation.py`), all from epoch aggregates (sums over the epoch and over ranks,
then means), so `val/gap` is exactly `val/primal - val/dual`:
- `val/recon`: E c(x, G(E(x))) (one encoder draw per sample for a Gaussian encoder);
- `val/latent_divergence_critic`: T's variational estimate of D_f(Q_Z || P_Z), a lower estimate,
  or f(1) (the constant critic's value, D_f's minimum) when T does worse;
- `val/latent_divergence_mc` (+ `_std_error`), Gaussian encoder and prior only: the critic-free
  Monte Carlo estimate of D_f between the mixture of all validation codes and P_Z
  (`latent_divergence.monte_carlo_divergence`, balanced proposal, `mc_samples` draws), unbiased for
  that mixture, an upward-biased estimate for the population Q_Z (much larger than T's when the
  encoder's variances are small: the mixture of N narrow Gaussians is spiky);
- `val/primal = val/recon + lambda * D_f estimate`, the estimate chosen by `primal_estimator`
  ("critic" or "monte_carlo"; announced once in the log at the start). It is an estimate, never a
  certified bound;
- `val/dual`: E_{P_X}[h] - E_{P_G}[(lambda f)*(h)] on held-out data and fresh samples;
- `val/gap = val/primal - val/dual`, >= 0 up to estimation error;
- `val/lipschitz_bound`: the certified bound on Lip(h) (operator norms, `lipschitz.py`);
- `val/dual_certified`: 1 when the dual value is a certified lower bound (g_f 1-Lipschitz, bound
  <= 1, c a metric), else 0;
- `val/dual_lower_bound` (1-Lipschitz g_f only): the dual value of v / max(1, Lip(v)), which is in
  H_c, so certified whatever the bound.

The dual value certifies a lower bound on the primal only for a metric cost (`l2`, the default;
for `l1`, H_{l2} is inside H_{l1}, so it still holds); `l2sq` is allowed but not covered.
With a deterministic encoder on a finite sample Q_Z is discrete and D_f(Q_Z || P_Z) is infinite
for unbounded f (kl and others): T's estimate keeps growing with its capacity (SPEC section 4).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_modules.base import GenerativeModule
from lightning_modules.divergences import get_divergence
from lightning_modules.latent_divergence import (
    batch_monte_carlo_divergence,
    check_monte_carlo_prior,
    gaussian_code_parameters,
    reparameterize,
)
from lightning_modules.lipschitz_critic import LipschitzCriticMixin
from lightning_modules.losses import CostName, PriorName, check_choice, check_cost_name
from lightning_modules.losses import cost as pointwise_cost
from lightning_modules.networks import build_critic, build_decoder, build_encoder
from lightning_modules.primal_dual_evaluation import PrimalDualEvaluationMixin

ENCODER_TYPES = ("deterministic", "gaussian")
PRIMAL_ESTIMATORS = ("critic", "monte_carlo")
GENERATOR_LOSSES = ("saturating", "non_saturating")
LIPSCHITZ_CHOICES = ("spectral_norm", "gradient_penalty", "none")
METRIC_COSTS = ("l2", "l1")  # costs for which the theorem applies with an l2-Lipschitz critic


class PrimalDual(PrimalDualEvaluationMixin, LipschitzCriticMixin, GenerativeModule):
    """Generator, encoder, Lipschitz data critic and latent critic: the f-WAE and the Lipschitz f-GAN
    as one model, with the duality gap between them logged at every validation.

    Args:
        data_shape: shape of one sample, (C, H, W) or (D,); the CLI links it from the datamodule.
        latent_dim: d_z.
        divergence: registry row f (kl, reverse_kl, pearson, neyman, hellinger, jensen_shannon, gan,
            total_variation); the latent penalty is D_f, the dual uses lambda f.
        lambda_: lambda > 0: weight of D_f in the primal, scale of f in the dual.
        alpha: in [0, 1]; generator loss alpha * primal + (1 - alpha) * (dual generator loss).
        cost: c, "l2" (a metric: the theorem's setting), "l1" or "l2sq" (not covered), summed over pixels.
        prior: P_Z, "gaussian", "sphere" or "cube".
        encoder_type: "deterministic" or "gaussian" (reparameterised N(mu(x), diag sigma^2(x))).
        primal_estimator: D_f estimate in `val/primal`: "critic" (latent critic, any encoder) or
            "monte_carlo" (critic-free, needs encoder_type="gaussian" and prior="gaussian").
        training_estimator: D_f estimate in the primal loss that E (and G) descend: "critic" (the
            latent critic's variational estimate, as the f-WAE) or "monte_carlo" (the differentiable
            critic-free estimate for the batch's Gaussian mixture, `batch_monte_carlo_divergence`: no
            adversary, and not a lower estimate that the encoder can exploit; needs encoder_type=
            "gaussian" and prior="gaussian"). T is trained either way, for val/latent_divergence_critic.
        generator_loss: dual side of the generator loss, "saturating" (descend -E (lambda f)*(h)) or
            "non_saturating" (descend -E h), as in the FGAN.
        lipschitz: data critic class: "spectral_norm" (operator norms), "gradient_penalty"
            (weight `gp_weight`) or "none"; the certificate is computed in every case.
        n_critic: steps of each critic per generator step.
        width, encoder_channels, decoder_channels: encoder / decoder size (as the WAE).
        critic_width, critic_channels, critic_depth, critic_activation: data critic (as the FGAN;
            "maxmin" brings the spectrally normalised critic, and so the dual, much closer to W_c).
        latent_critic_width, latent_critic_depth: latent critic MLP.
        mc_samples: draws of the Monte Carlo estimate, half from P_Z and half from the codes' mixture
            (Gaussian encoder and prior only).
        lr: Adam learning rate of the encoder and generator; critic_lr: data critic;
            latent_critic_lr: latent critic. betas: Adam betas of all three.
        output_activation: "auto" (tanh for images in [-1, 1], none for vectors), "tanh", "none".
        skip_nonfinite_critic_steps: skip a critic step (latent or data critic) whose loss is NaN or
            infinite (no update, optimiser state untouched; counted in `train/skipped_critic_steps`)
            instead of stopping. A non-finite encoder / generator loss always stops training.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 8,
        divergence: str = "jensen_shannon",
        lambda_: float = 1.0,
        alpha: float = 0.5,
        cost: CostName = "l2",
        prior: PriorName = "gaussian",
        encoder_type: Literal["deterministic", "gaussian"] = "deterministic",
        primal_estimator: Literal["critic", "monte_carlo"] = "critic",
        training_estimator: Literal["critic", "monte_carlo"] = "critic",
        generator_loss: Literal["saturating", "non_saturating"] = "saturating",
        lipschitz: Literal["spectral_norm", "gradient_penalty", "none"] = "spectral_norm",
        gp_weight: float = 10.0,
        n_critic: int = 1,
        width: int = 64,
        encoder_channels: list[int] | None = None,
        decoder_channels: list[int] | None = None,
        critic_width: int = 64,
        critic_channels: list[int] | None = None,
        critic_depth: int = 3,
        critic_activation: Literal["leaky_relu", "maxmin"] = "leaky_relu",
        latent_critic_width: int = 256,
        latent_critic_depth: int = 3,
        mc_samples: int = 4096,
        lr: float = 1e-3,
        critic_lr: float = 2e-4,
        latent_critic_lr: float = 5e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        output_activation: Literal["auto", "tanh", "none"] = "auto",
        skip_nonfinite_critic_steps: bool = False,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        self.save_hyperparameters()
        check_cost_name(cost)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        check_choice("primal_estimator", primal_estimator, PRIMAL_ESTIMATORS)
        check_choice("training_estimator", training_estimator, PRIMAL_ESTIMATORS)
        check_choice("generator_loss", generator_loss, GENERATOR_LOSSES)
        check_choice("lipschitz", lipschitz, LIPSCHITZ_CHOICES)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1] (1: the f-WAE, 0: the Lipschitz f-GAN, between: a mixture), got {alpha}."
            )
        if not (lambda_ > 0 and math.isfinite(lambda_)):
            raise ValueError(f"lambda_ must be a positive number, got {lambda_}.")
        if n_critic < 1 or gp_weight < 0 or mc_samples < 2:
            raise ValueError(
                f"Need n_critic >= 1, gp_weight >= 0 and mc_samples >= 2, got {n_critic}, {gp_weight} and {mc_samples}."
            )
        for name, estimator in (("primal_estimator", primal_estimator), ("training_estimator", training_estimator)):
            if estimator == "monte_carlo":
                if encoder_type != "gaussian":
                    raise ValueError(
                        f"{name}='monte_carlo' needs encoder_type='gaussian': a deterministic encoder's "
                        f"Q_Z on a finite sample is discrete, with no density. Use {name}='critic'."
                    )
                check_monte_carlo_prior(prior)
        self.latent_divergence = get_divergence(divergence)  # f: D_f(Q_Z || P_Z) in the primal
        self.data_divergence = get_divergence(divergence, lambda_)  # lambda f: GAN_{lambda f} in the dual
        if cost not in METRIC_COSTS:
            rank_zero_warn(
                f"PrimalDual with cost={cost!r}: not a metric, so the dual value bounds nothing on the primal "
                f"side and val/dual_certified stays 0. The theorem needs a metric: {', '.join(METRIC_COSTS)}."
            )

        code_size = latent_dim * (2 if encoder_type == "gaussian" else 1)
        self.encoder = build_encoder(self.data_shape, code_size, width, encoder_channels)
        self.decoder = build_decoder(
            self.data_shape, latent_dim, width, decoder_channels, self.resolve_output_activation(output_activation)
        )
        self.critic = build_critic(
            self.data_shape, critic_width, critic_channels, critic_depth, spectral_norm=lipschitz == "spectral_norm",
            activation=critic_activation,
        )
        self.latent_critic = build_critic((latent_dim,), latent_critic_width, depth=latent_critic_depth)
        self._epoch_bound: float | None = None
        self._sums: Tensor | None = None
        self._codes: list[tuple[Tensor, Tensor]] = []
        self._announced = False

    # ---- encoder ------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """A latent code of each sample: E(x), or a reparameterised draw for a gaussian encoder.
        (B, *data_shape) -> (B, latent_dim)."""
        out = self.encoder(x)  # (B, d_z) or (B, 2 d_z)
        if self.hparams.encoder_type == "deterministic":
            return out
        return reparameterize(*gaussian_code_parameters(out))

    def encode_parameters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clamped log-variance of a gaussian encoder. (B, *data_shape) -> 2 x (B, latent_dim)."""
        if self.hparams.encoder_type != "gaussian":
            raise ValueError(
                "encode_parameters needs encoder_type='gaussian'; a deterministic encoder has no variance."
            )
        return gaussian_code_parameters(self.encoder(x))

    # ---- the primal side ----------------------------------------------------------------------

    def reconstruction_cost(self, x: Tensor, x_rec: Tensor) -> Tensor:
        """E c(x, G(E(x))) over the batch."""
        return pointwise_cost(x, x_rec, self.hparams.cost).mean()

    def latent_divergence_critic(self, z: Tensor, z_prior: Tensor) -> Tensor:
        """Variational estimate E_{Q_Z}[g_f(T)] - E_{P_Z}[f*(g_f(T))] of D_f(Q_Z || P_Z), from codes
        z (B, d_z) and prior draws z_prior (B', d_z): a lower estimate for any critic T."""
        return self.latent_divergence.variational_estimate(self.latent_critic_output(z), self.latent_critic_output(z_prior))

    def latent_critic_output(self, z: Tensor) -> Tensor:
        """T's network plus the constant v0 with g_f(v0) = f'(1) (1 for kl, else 0). (B, d_z) -> (B,)."""
        return self.latent_critic(z) + self.latent_divergence.neutral_output

    def primal_loss(
        self, x: Tensor, z: Tensor, z_prior: Tensor, code_parameters: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(recon + lambda * D_f estimate, recon, D_f estimate) for data x, its codes z and prior draws
        z_prior: the f-WAE loss that the encoder (and, weighted by alpha, the generator) descends.
        The estimate is the latent critic's, or with training_estimator="monte_carlo" the batch
        mixture's Monte Carlo estimate, which needs the codes' (mean, log_var) in `code_parameters`."""
        recon = self.reconstruction_cost(x, self.decode(z))
        if self.hparams.training_estimator == "monte_carlo":
            if code_parameters is None:
                raise ValueError("training_estimator='monte_carlo' needs the codes' (mean, log_var) in code_parameters.")
            penalty = batch_monte_carlo_divergence(self.latent_divergence, *code_parameters, z, z_prior)
        else:
            penalty = self.latent_divergence_critic(z, z_prior)
        return recon + self.hparams.lambda_ * penalty, recon, penalty

    # ---- the dual side ------------------------------------------------------------------------

    @property
    def critic_divergence(self):
        return self.data_divergence  # lambda f

    def _cost_is_metric(self) -> bool:
        return self.hparams.cost in METRIC_COSTS

    def combined_generator_loss(self, primal: Tensor, dual_generator: Tensor | None) -> Tensor:
        """alpha * primal + (1 - alpha) * dual_generator, with the term of weight 0 left out (so
        alpha = 1 and alpha = 0 give each loss exactly, and dual_generator may be None at alpha = 1)."""
        alpha = self.hparams.alpha
        if alpha == 1.0:
            return primal
        if alpha == 0.0:
            return dual_generator
        return alpha * primal + (1.0 - alpha) * dual_generator

    # ---- training -----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self._announced:
            self._announced = True
            rank_zero_info(
                f"PrimalDual: val/primal = val/recon + lambda * D_f with primal_estimator="
                f"{self.hparams.primal_estimator!r}: {self.primal_estimator_description()}."
            )

    def primal_estimator_description(self) -> str:
        """Which estimator gives the D_f term of val/primal, in words."""
        if self.hparams.primal_estimator == "monte_carlo":
            return (
                "D_f from the critic-free Monte Carlo estimate for the Gaussian mixture of the validation codes "
                f"({self.hparams.mc_samples} draws, half from P_Z, half from the mixture; val/latent_divergence_mc)"
            )
        return "D_f from the latent critic's variational (lower) estimate (val/latent_divergence_critic)"

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x = self.batch_data(batch)  # (B, *data_shape)
        batch_size = x.shape[0]
        opt_ae, opt_latent, opt_critic = self.optimizers()
        code_parameters = None  # (mean, log_var) of a Gaussian encoder, each (B, d_z)
        if self.hparams.encoder_type == "gaussian":
            code_parameters = self.encode_parameters(x)
            z = reparameterize(*code_parameters)  # (B, d_z): the same draw as self.encode(x)
        else:
            z = self.encode(x)  # (B, d_z)
        values, skipped = {}, 0  # critic values of the last step taken; steps skipped (non-finite)

        # The latent critic T ascends its estimate of D_f(Q_Z || P_Z) (as the f-WAE's).
        self.toggle_optimizer(opt_latent)
        for _ in range(self.hparams.n_critic):
            latent_objective = self.latent_divergence_critic(z.detach(), self.sample_latent(batch_size).to(z.dtype))
            if not self.check_finite("train/latent_critic_loss", -latent_objective, critic=True):
                skipped += 1  # no backward, no step: T and its optimiser state as they were
                continue
            opt_latent.zero_grad()
            self.manual_backward(-latent_objective)
            opt_latent.step()
            values["train/latent_critic_objective"] = latent_objective
        self.untoggle_optimizer(opt_latent)

        # The data critic h ascends the dual value (as the Lipschitz f-GAN's), fresh fakes each step.
        self.toggle_optimizer(opt_critic)
        for _ in range(self.hparams.n_critic):
            fake = self.decode(self.sample_latent(batch_size)).detach()
            critic_loss, dual_objective, grad_norm = self.critic_loss(x, fake)
            if not self.check_finite("train/critic_loss", critic_loss, critic=True):
                skipped += 1
                continue
            opt_critic.zero_grad()
            self.manual_backward(critic_loss)
            opt_critic.step()
            values.update({"train/critic_objective": dual_objective, "train/critic_loss": critic_loss})
            if grad_norm is not None:
                values["train/gradient_norm"] = grad_norm
        self.untoggle_optimizer(opt_critic)

        # E descends the primal; G descends alpha * primal + (1 - alpha) * dual generator loss.
        self.toggle_optimizer(opt_ae)
        primal, recon, penalty = self.primal_loss(x, z, self.sample_latent(batch_size).to(z.dtype), code_parameters)
        self.check_finite("train/primal", primal)
        dual_generator = None
        if self.hparams.alpha < 1.0:
            dual_generator = self.dual_generator_loss(self.decode(self.sample_latent(batch_size)))
            self.check_finite("train/dual_generator_loss", dual_generator)
        opt_ae.zero_grad()
        self._backward_encoder_generator(primal, dual_generator)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)

        values.update({
            "train/recon": recon,
            f"train/latent_divergence_{self.hparams.training_estimator}": penalty,
            "train/primal": primal,
            "train/generator_loss": self.combined_generator_loss(primal, dual_generator),
        })
        self.log_dict({k: v.detach() for k, v in values.items()}, on_step=True, on_epoch=True)
        self.log_skipped_critic_steps(skipped)

    def _backward_encoder_generator(self, primal: Tensor, dual_generator: Tensor | None) -> None:
        """Gradients: encoder d(primal)/dE; generator d/dG [alpha * primal + (1 - alpha) * dual_generator].

        One backward of the primal fills both; the generator's share is then scaled by alpha (dropped
        at alpha = 0, untouched at alpha = 1) before the dual term's backward adds to it.
        """
        alpha = self.hparams.alpha
        self.manual_backward(primal)
        if dual_generator is None:
            return
        for p in self.decoder.parameters():
            if p.grad is not None:
                if alpha == 0.0:
                    p.grad = None
                else:
                    p.grad.mul_(alpha)
        self.manual_backward((1.0 - alpha) * dual_generator)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = tuple(self.hparams.betas)
        ae_params = [*self.encoder.parameters(), *self.decoder.parameters()]
        return [
            torch.optim.Adam(ae_params, lr=self.hparams.lr, betas=betas),
            torch.optim.Adam(self.latent_critic.parameters(), lr=self.hparams.latent_critic_lr, betas=betas),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, betas=betas),
        ]
