"""The hybrid primal-dual model: an f-WAE and a Lipschitz f-GAN trained together (docs/theory.md 3.4, 4).

With c a metric, H_c its 1-Lipschitz functions and lambda > 0 (Husain, Nock, Williamson 2019):

    dual    GAN_{lambda f}(P_X, G; H_c) = sup_{h in H_c} E_{P_X}[h] - E_{P_G}[(lambda f)*(h)]
         <= fWAE_{c,lambda}(P_X, G)     = inf_E  E_{P_X}[c(x, G(E(x)))] + lambda D_f(Q_Z || P_Z)   primal
         <= W_c(P_X, P_G).

Four networks: the generator / decoder G, the encoder E, a Lipschitz data critic h (layers
divided by their operator norms by default) and a latent critic T for D_f(Q_Z || P_Z):

- T ascends its variational estimate of D_f(Q_Z || P_Z);
- h = lambda g_f(v / lambda) ascends the dual value E_{P_X}[h] - E_{P_G}[(lambda f)*(h)];
- E descends the primal loss E c(x, G(E(x))) + lambda * (T's estimate), or with
  `training_estimator="monte_carlo"` (Gaussian encoder) the critic-free estimate for the batch's
  Gaussian mixture in place of T's;
- G descends alpha * primal + (1 - alpha) * (generator side of the dual). alpha = 1 is the f-WAE
  (`WAE(latent_penalty="f")`), alpha = 0 the Lipschitz f-GAN (`FGAN(lipschitz="spectral_norm",
  lambda_scale=lambda_)`): same losses, same gradients.

Logged at every validation epoch, from exact epoch aggregates over batches and ranks
(`evaluation.PrimalDualEvaluation`):
- `val/recon`; `val/latent_divergence_critic` (T's lower estimate, floored at f(1));
- `val/latent_divergence_mc` (+ `_std_error`), Gaussian encoder and prior only: the critic-free Monte
  Carlo D_f of the mixture of all validation codes (docs/theory.md 4.5);
- `val/primal = val/recon + lambda * D_f estimate`, the estimate chosen by `primal_estimator`
  (announced once in the log). An estimate, never a certified bound;
- `val/dual` on held-out data and fresh samples; `val/gap = val/primal - val/dual`;
- `val/lipschitz_bound` (certified bound on Lip(h)), `val/dual_certified` (1 when the dual value is a
  certified lower bound), `val/dual_lower_bound` (the certified dual value, docs/theory.md 4.4).

The dual value bounds the primal only for a metric cost (`l2`, the default; `l1` too, since H_{l2}
is inside H_{l1}); `l2sq` is allowed but not covered. With a deterministic encoder on a finite
sample Q_Z is discrete and D_f(Q_Z || P_Z) is infinite for unbounded f (docs/theory.md 4.2).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence, get_args

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_modules.autoencoder import Autoencoder
from lightning_modules.critic import Critic
from lightning_modules.evaluation import PrimalDualEvaluation
from lightning_modules.networks import CriticActivation, Init, OutputActivation, Upsample, build_critic
from maths.choices import check_choice
from maths.divergences import get_divergence
from maths.dual import (
    GENERATOR_LOSSES, LIPSCHITZ_METHODS, GeneratorLoss, LipschitzMethod, dual_terms, f_at_one, is_dual_certified,
)
from maths.gaussian_codes import EncoderType, batch_monte_carlo_divergence, check_monte_carlo_prior, monte_carlo_divergence
from maths.layers import eval_mode
from maths.priors import PriorName
from transport.costs import METRIC_COSTS, CostName, cost

Estimator = Literal["critic", "monte_carlo"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
MC_SEED = 0  # the Monte Carlo draws are the same every epoch: epochs differ by the model only


class PrimalDual(Autoencoder):
    """Generator, encoder, Lipschitz data critic and latent critic: the f-WAE and the Lipschitz f-GAN
    as one model, with the duality gap between them logged at every validation.

    Args:
        data_shape: shape of one sample, (C, H, W) or (D,); the CLI links it from the datamodule.
        latent_dim: d_z.
        divergence: registry row f; the latent penalty is D_f, the dual uses lambda f.
        lambda_: lambda > 0: weight of D_f in the primal, scale of f in the dual.
        alpha: in [0, 1]; generator loss alpha * primal + (1 - alpha) * (dual generator loss).
        cost: c, "l2" (a metric: the theorem's setting), "l1" or "l2sq" (not covered), summed over pixels.
        prior: P_Z, "gaussian", "sphere" or "cube".
        encoder_type: "deterministic" or "gaussian" (reparameterised N(mu(x), diag sigma^2(x))).
        primal_estimator: D_f estimate in `val/primal`: "critic" (latent critic, any encoder) or
            "monte_carlo" (critic-free, needs encoder_type="gaussian" and prior="gaussian").
        training_estimator: D_f estimate in the primal loss that E (and G) descend: "critic" or
            "monte_carlo" (the differentiable critic-free estimate for the batch's Gaussian mixture:
            no adversary to exploit). T is trained either way, for val/latent_divergence_critic.
        generator_loss: dual side of the generator loss, "saturating" or "non_saturating".
        lipschitz: data critic class: "spectral_norm" (operator norms), "gradient_penalty"
            (weight `gp_weight`) or "none"; the certificate is computed in every case.
        n_critic: steps of each critic per generator step.
        width, encoder_channels, decoder_channels: encoder / decoder size (as the WAE).
        critic_width, critic_channels, critic_depth, critic_activation: data critic (as the FGAN).
        latent_critic_width, latent_critic_depth: latent critic MLP.
        mc_samples: draws of the Monte Carlo estimate (Gaussian encoder and prior only).
        lr: Adam learning rate of the encoder and generator; critic_lr: data critic;
            latent_critic_lr: latent critic. betas: Adam betas of all three.
        output_activation: "auto" (tanh for images in [-1, 1], none for vectors), "tanh", "none".
        upsample: how the image decoder doubles its grid, "transposed" or "resize"
            (`networks.ConvDecoder`).
        init: "default" (PyTorch's) or "dcgan" (`networks.init_weights`), for every network built here.
        skip_nonfinite_critic_steps: skip a critic step whose loss is NaN or infinite (counted in
            `train/skipped_critic_steps`) instead of stopping.
        channels_last, compile: speed options (`GenerativeModule.configure_model`): image networks in
            channels-last memory order; each network compiled with `torch.compile`.
        encoder, decoder, critic, latent_critic: networks to use instead of the builders' (encoder
            (B, *data_shape) -> (B, d_z), or 2 d_z for a Gaussian encoder; decoder (B, d_z) ->
            (B, *data_shape); critics -> (B,)). Not saved as hyperparameters: pass them again to
            `load_from_checkpoint`.
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
        encoder_type: EncoderType = "deterministic",
        primal_estimator: Estimator = "critic",
        training_estimator: Estimator = "critic",
        generator_loss: GeneratorLoss = "saturating",
        lipschitz: LipschitzMethod = "spectral_norm",
        gp_weight: float = 10.0,
        n_critic: int = 1,
        width: int = 64,
        encoder_channels: list[int] | None = None,
        decoder_channels: list[int] | None = None,
        critic_width: int = 64,
        critic_channels: list[int] | None = None,
        critic_depth: int = 3,
        critic_activation: CriticActivation = "leaky_relu",
        latent_critic_width: int = 256,
        latent_critic_depth: int = 3,
        mc_samples: int = 4096,
        lr: float = 1e-3,
        critic_lr: float = 2e-4,
        latent_critic_lr: float = 5e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        output_activation: OutputActivation = "auto",
        upsample: Upsample = "transposed",
        init: Init = "default",
        skip_nonfinite_critic_steps: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        critic: nn.Module | None = None,
        latent_critic: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior, cost, encoder_type, width, encoder_channels, decoder_channels,
                         output_activation, encoder, decoder, upsample, init)
        self.save_hyperparameters(ignore=["encoder", "decoder", "critic", "latent_critic"])
        for kind, value, known in (
            ("primal_estimator", primal_estimator, ESTIMATORS),
            ("training_estimator", training_estimator, ESTIMATORS),
            ("generator_loss", generator_loss, GENERATOR_LOSSES),
            ("lipschitz", lipschitz, LIPSCHITZ_METHODS),
        ):
            check_choice(kind, value, known)
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
        if cost not in METRIC_COSTS:
            rank_zero_warn(
                f"PrimalDual with cost={cost!r}: not a metric, so the dual value bounds nothing on the primal "
                f"side and val/dual_certified stays 0. The theorem needs a metric: {', '.join(METRIC_COSTS)}."
            )
        self.latent_divergence = get_divergence(divergence)  # f: D_f(Q_Z || P_Z) in the primal
        self.data_divergence = get_divergence(divergence, lambda_)  # lambda f: GAN_{lambda f} in the dual
        critic = critic if critic is not None else build_critic(
            self.data_shape, critic_width, critic_channels, critic_depth, spectral_norm=lipschitz == "spectral_norm",
            activation=critic_activation, init=init,
        )
        self.critic = Critic(critic, self.data_divergence, self.data_shape, gp_weight if lipschitz == "gradient_penalty" else 0.0)
        if latent_critic is None:
            latent_critic = build_critic((latent_dim,), latent_critic_width, depth=latent_critic_depth, init=init)
        self.latent_critic = Critic(latent_critic, self.latent_divergence, (latent_dim,))
        self.evaluation = PrimalDualEvaluation()
        self._epoch_bound: float | None = None  # the data critic's certified bound, once per evaluation epoch
        self._announced = False

    # ---- the primal side ----------------------------------------------------------------------

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
            penalty = self.latent_critic.objective(z, z_prior)
        return recon + self.hparams.lambda_ * penalty, recon, penalty

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
        z, code_parameters = self.encode_with_parameters(x)  # (B, d_z); (mean, log_var) of a Gaussian encoder
        hp = self.hparams

        def latent_step() -> tuple[Tensor, dict[str, Tensor]]:  # T ascends its estimate of D_f(Q_Z || P_Z)
            objective = self.latent_critic.objective(z.detach(), self.sample_latent(batch_size).to(z.dtype))
            return -objective, {"train/latent_critic_objective": objective}

        def critic_step() -> tuple[Tensor, dict[str, Tensor]]:  # h ascends the dual value, fresh fakes each step
            fake = self.decode(self.sample_latent(batch_size)).detach()
            loss, objective, grad_norm = self.critic.loss(x, fake)
            values = {"train/critic_objective": objective, "train/critic_loss": loss}
            return loss, values if grad_norm is None else {**values, "train/gradient_norm": grad_norm}

        self.adversary_steps(opt_latent, latent_step, hp.n_critic, "train/latent_critic_loss")
        self.adversary_steps(opt_critic, critic_step, hp.n_critic, "train/critic_loss")

        # E descends the primal; G descends alpha * primal + (1 - alpha) * dual generator loss.
        self.toggle_optimizer(opt_ae)
        primal, recon, penalty = self.primal_loss(x, z, self.sample_latent(batch_size).to(z.dtype), code_parameters)
        losses = {"train/primal": primal}
        dual_generator = None
        if hp.alpha < 1.0:
            dual_generator = self.critic.generator_loss(self.decode(self.sample_latent(batch_size)), hp.generator_loss)
            losses["train/dual_generator_loss"] = dual_generator
        values = {
            "train/recon": recon,
            f"train/latent_divergence_{hp.training_estimator}": penalty,
            "train/primal": primal,
            "train/generator_loss": self.combined_generator_loss(primal, dual_generator),
        }
        self.guarded_step(opt_ae, losses, values, backward=lambda: self._backward_encoder_generator(primal, dual_generator))
        self.untoggle_optimizer(opt_ae)
        values = self.finish_step()
        self.log_dict({k: v.detach() for k, v in values.items()}, on_step=True, on_epoch=True)

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
        hp = self.hparams
        return [
            self.adam(self.autoencoder_parameters(), hp.lr, hp.betas),
            self.adam(self.latent_critic.parameters(), hp.latent_critic_lr, hp.betas),
            self.adam(self.critic.parameters(), hp.critic_lr, hp.betas),
        ]

    # ---- evaluation: the primal, the dual and the gap as epoch aggregates ----------------------

    @property
    def _monte_carlo_available(self) -> bool:
        return self.hparams.encoder_type == "gaussian" and self.hparams.prior == "gaussian"

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()


    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _start_evaluation(self) -> None:
        self._epoch_bound = self.critic.network_bound()  # the critic does not change during evaluation
        self.evaluation.reset()

    def evaluation_step(self, split: str, batch: Any, batch_idx: int) -> None:
        real = self.batch_data(batch)  # (B, *data_shape)
        batch_size = real.shape[0]
        z, code_parameters = self.encode_with_parameters(real)
        recon = cost(real, self.decode(z), self.hparams.cost)  # (B,)
        latent_encoded, latent_prior = self.latent_critic.terms(z, self.sample_latent(batch_size).to(z.dtype))
        fake = self.sample(batch_size)  # (B, *data_shape)
        with eval_mode(self.critic):
            raw_real, raw_fake = self.critic(real), self.critic(fake)  # (B,), (B,): the network alone
            dual_real, dual_fake = dual_terms(self.data_divergence, raw_real, raw_fake)
            certified_real, certified_fake = dual_terms(self.data_divergence, raw_real, raw_fake, max(1.0, self._epoch_bound))
            terms = {
                "recon": recon, "latent_encoded": latent_encoded, "latent_prior": latent_prior,
                "dual_real": dual_real, "dual_fake": dual_fake,
                "certified_real": certified_real, "certified_fake": certified_fake,
            }
            self.evaluation.update(terms, code_parameters if self._monte_carlo_available else None)
            if self.hparams.lipschitz != "none":
                estimate = self.critic.pair_lipschitz_estimate(real, fake)
                self.log(f"{split}/lipschitz_estimate", estimate, reduce_fx="max", sync_dist=True)

    def _end_evaluation(self, split: str) -> None:
        if self.evaluation.update_count == 0:
            return
        means = self.evaluation.compute()  # reduced over ranks: every rank holds the same values
        # Both T's estimate and f(1) (the value of the constant critic f'(1)) are lower estimates of
        # D_f >= f(1); keep the better one (a negative D_kl estimate only says T is worse than a constant).
        divergence_critic = torch.clamp(means["latent_encoded"] - means["latent_prior"], min=f_at_one(self.latent_divergence))
        dual = means["dual_real"] - means["dual_fake"]
        metrics = {f"{split}/recon": means["recon"], f"{split}/latent_divergence_critic": divergence_critic, f"{split}/dual": dual}
        divergence = divergence_critic
        if "mean" in means:
            estimate = monte_carlo_divergence(
                self.latent_divergence, means["mean"], means["log_var"], self.hparams.mc_samples, self.hparams.prior,
                generator=torch.Generator(device=means["mean"].device).manual_seed(MC_SEED),
            )
            metrics[f"{split}/latent_divergence_mc"] = estimate.value
            metrics[f"{split}/latent_divergence_mc_std_error"] = estimate.std_error
            if self.hparams.primal_estimator == "monte_carlo":
                divergence = estimate.value
        primal = means["recon"] + self.hparams.lambda_ * divergence
        metrics[f"{split}/primal"] = primal
        metrics[f"{split}/gap"] = primal - dual
        metrics[f"{split}/lipschitz_bound"] = self.critic.lipschitz_bound(self._epoch_bound)
        certified = is_dual_certified(self.data_divergence, self._epoch_bound, self.hparams.cost in METRIC_COSTS)
        metrics[f"{split}/dual_certified"] = float(certified)
        if self.data_divergence.is_activation_1_lipschitz:
            metrics[f"{split}/dual_lower_bound"] = means["certified_real"] - means["certified_fake"]
        # Every rank holds the same values here; sync_dist keeps Lightning's epoch-level convention.
        shown = {f"{split}/{key}" for key in ("primal", "dual", "gap")}
        self.log_dict({k: v for k, v in metrics.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, sync_dist=True)
