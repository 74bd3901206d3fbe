"""The f-GAN (Nowozin, Cseke, Tomioka 2016) and its Lipschitz, lambda-scaled form: the dual side
of the primal-dual link (SPEC sections 3 and 4).

A critic network outputs v(x); with the registry row for lambda f, the critic is
h = lambda g_f(v / lambda) and

    GAN_{lambda f}(P_X, G; H) = sup_h  E_{P_X}[h(x)] - E_{P_G}[(lambda f)*(h(x))].

The critic ascends that objective (its value on a batch is the variational estimate of
D_{lambda f}(P_X || P_G), a lower bound for any critic); the generator descends it
(`saturating`) or ascends E_{P_G}[h] (`non_saturating`, the usual trick: -log D for `gan`).

With `lipschitz="spectral_norm"` every layer of the critic is divided by its operator norm
(convolutions as operators on images, not reshaped kernels), with `"gradient_penalty"` the
critic is pushed towards unit gradient norm at interpolates. The dual value is a *certified*
lower bound on GAN_{lambda f}(P_X, G; H_c) <= W_c(P_X, P_G) (c = l2 on flattened samples) only
when the critic is in H_c: g_f 1-Lipschitz and a certified Lipschitz bound <= 1
(`critic_lipschitz_bound`). `certified_dual_value` divides v by max(1, bound of v) first, which
puts the critic in H_c for every 1-Lipschitz g_f, so it is a certified lower bound in all those
cases.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from lightning_modules.base import GenerativeModule
from lightning_modules.divergences import get_divergence
from lightning_modules.lipschitz_critic import LipschitzCriticMixin
from lightning_modules.losses import PriorName, check_choice
from lightning_modules.networks import build_critic, build_decoder

LIPSCHITZ_CHOICES = ("none", "spectral_norm", "gradient_penalty")
GENERATOR_LOSSES = ("non_saturating", "saturating")


class FGAN(LipschitzCriticMixin, GenerativeModule):
    """f-GAN for any registry divergence, optionally with a Lipschitz critic and lambda scaling.

    Args:
        data_shape: shape of one sample, (C, H, W) or (D,); the CLI links it from the datamodule.
        latent_dim: dimension of the generator's input z ~ prior.
        divergence: registry row (kl, reverse_kl, pearson, neyman, hellinger, jensen_shannon,
            gan, total_variation).
        generator_loss: "non_saturating" (ascend E_Q[h]) or "saturating" (descend the objective).
        lipschitz: "none", "spectral_norm" or "gradient_penalty" (weight `gp_weight`).
        lambda_scale: lambda of GAN_{lambda f}: h = lambda g_f(v / lambda), conjugate (lambda f)*.
        n_critic: critic steps per generator step (on the same real batch, fresh fakes).
        width, generator_channels: generator size (as the WAE decoder).
        critic_width, critic_channels, critic_depth: critic size (MLP depth for vector data).
        critic_activation: "leaky_relu" (slope 0.2) or "maxmin" (GroupSort of pairs, gradient-norm
            preserving: with `spectral_norm` it gets much closer to the best 1-Lipschitz critic;
            widths and channels must be even).
        lr, critic_lr, betas: Adam settings of the generator and of the critic.
        output_activation: "auto" (tanh for images, none for vectors), "tanh" or "none".
        skip_nonfinite_critic_steps: skip a critic step whose loss is NaN or infinite (no update,
            optimiser state untouched; counted in `train/skipped_critic_steps`) instead of stopping.
            A non-finite generator loss always stops training.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 16,
        divergence: str = "jensen_shannon",
        generator_loss: Literal["non_saturating", "saturating"] = "non_saturating",
        lipschitz: Literal["none", "spectral_norm", "gradient_penalty"] = "none",
        gp_weight: float = 10.0,
        lambda_scale: float = 1.0,
        n_critic: int = 1,
        prior: PriorName = "gaussian",
        width: int = 64,
        generator_channels: list[int] | None = None,
        critic_width: int = 64,
        critic_channels: list[int] | None = None,
        critic_depth: int = 3,
        critic_activation: Literal["leaky_relu", "maxmin"] = "leaky_relu",
        lr: float = 2e-4,
        critic_lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        output_activation: Literal["auto", "tanh", "none"] = "auto",
        skip_nonfinite_critic_steps: bool = False,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        self.save_hyperparameters()
        check_choice("lipschitz", lipschitz, LIPSCHITZ_CHOICES)
        check_choice("generator_loss", generator_loss, GENERATOR_LOSSES)
        if n_critic < 1 or gp_weight < 0:
            raise ValueError(f"Need n_critic >= 1 and gp_weight >= 0, got {n_critic} and {gp_weight}.")
        self.divergence = get_divergence(divergence, lambda_scale)
        self.decoder = build_decoder(
            self.data_shape, latent_dim, width, generator_channels, self.resolve_output_activation(output_activation)
        )
        self.critic = build_critic(
            self.data_shape, critic_width, critic_channels, critic_depth, spectral_norm=lipschitz == "spectral_norm",
            activation=critic_activation,
        )
        self._epoch_bound: float | None = None

    @property
    def critic_divergence(self):
        return self.divergence  # lambda f

    def generator_loss(self, fake: Tensor) -> Tensor:
        """Saturating: descend -E_fake[(lambda f)*(h)] (the objective's G-dependent term);
        non-saturating: descend -E_fake[h]."""
        return self.dual_generator_loss(fake)

    # ---- training -----------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = self.batch_data(batch)  # (B, *data_shape)
        opt_generator, opt_critic = self.optimizers()
        values, skipped = {}, 0
        self.toggle_optimizer(opt_critic)
        for _ in range(self.hparams.n_critic):
            fake = self.decode(self.sample_latent(real.shape[0])).detach()
            loss, objective, grad_norm = self.critic_loss(real, fake)
            if not self.check_finite("train/critic_loss", loss, critic=True):
                skipped += 1  # no backward, no step: critic and optimiser state as they were
                continue
            opt_critic.zero_grad()
            self.manual_backward(loss)
            opt_critic.step()
            values = {"train/critic_objective": objective, "train/critic_loss": loss}
            if grad_norm is not None:
                values["train/gradient_norm"] = grad_norm
        self.untoggle_optimizer(opt_critic)

        self.toggle_optimizer(opt_generator)
        generator_loss = self.generator_loss(self.decode(self.sample_latent(real.shape[0])))
        self.check_finite("train/generator_loss", generator_loss)
        opt_generator.zero_grad()
        self.manual_backward(generator_loss)
        opt_generator.step()
        self.untoggle_optimizer(opt_generator)

        values["train/generator_loss"] = generator_loss
        self.log_dict({k: v.detach() for k, v in values.items()}, on_step=True, on_epoch=True)
        self.log_skipped_critic_steps(skipped)

    def _certify_critic(self) -> None:
        # The critic does not change during evaluation: one certificate per epoch.
        self._epoch_bound = self._network_bound() if self.hparams.lipschitz != "none" else None

    def on_validation_epoch_start(self) -> None:
        self._certify_critic()

    def on_test_epoch_start(self) -> None:
        self._certify_critic()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_eval("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_eval("test", batch)

    def _shared_eval(self, split: str, batch: Any) -> None:
        real = self.batch_data(batch)
        fake = self.sample(real.shape[0])
        self.log(f"{split}/critic_objective", self.dual_value(real, fake), prog_bar=True, sync_dist=True)
        if self._epoch_bound is None:
            return
        pairs_estimate = self.pair_lipschitz_estimate(real, fake)
        bound = self._epoch_bound * self.divergence.activation_lipschitz
        self.log(f"{split}/lipschitz_estimate", pairs_estimate, reduce_fx="max", sync_dist=True)
        self.log(f"{split}/lipschitz_bound", bound, sync_dist=True)
        self.log(f"{split}/dual_certified", float(self.is_dual_certified(bound)), sync_dist=True)
        certified = self.certified_dual_value(real, fake, self._epoch_bound)
        if not torch.isnan(certified):
            self.log(f"{split}/dual_lower_bound", certified, sync_dist=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = tuple(self.hparams.betas)
        return [
            torch.optim.Adam(self.decoder.parameters(), lr=self.hparams.lr, betas=betas),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, betas=betas),
        ]

