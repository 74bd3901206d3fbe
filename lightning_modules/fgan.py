"""The f-GAN (Nowozin, Cseke, Tomioka 2016) and its Lipschitz, lambda-scaled form: the dual side
of the primal-dual link (docs/theory.md 3.1, 4.3, 4.4).

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
(`critic.lipschitz_bound()`). `critic.certified_value` divides the network by max(1, its bound)
first, which puts the critic in H_c for every 1-Lipschitz g_f, so it is a certified lower bound in
all those cases.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_modules.base import GenerativeModule
from lightning_modules.critic import Critic
from lightning_modules.networks import CriticActivation, Init, OutputActivation, Upsample, build_critic, build_decoder
from maths.choices import check_choice
from maths.divergences import get_divergence
from maths.dual import GENERATOR_LOSSES, LIPSCHITZ_METHODS, GeneratorLoss, LipschitzMethod, is_dual_certified
from maths.layers import eval_mode
from maths.priors import PriorName


class FGAN(GenerativeModule):
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
        upsample: how the image generator doubles its grid: "transposed" (stride-2 transposed
            convolutions, DCGAN's) or "resize" (nearest-neighbour doubling + 3x3 convolution, no
            checkerboard pattern; `networks.ConvDecoder`). What each measured on the digits and
            MNIST: docs/STUDIES.md section 10.
        init: "default" (PyTorch's initialisation) or "dcgan" (weights N(0, 0.02), batch-norm scales
            N(1, 0.02); `networks.init_weights`), for the generator and the critic.
        critic_width, critic_channels, critic_depth: critic size (MLP depth for vector data).
        critic_activation: "leaky_relu" (slope 0.2) or "maxmin" (GroupSort of pairs, gradient-norm
            preserving: with `spectral_norm` it gets much closer to the best 1-Lipschitz critic;
            widths and channels must be even).
        lr, critic_lr, betas: Adam settings of the generator and of the critic.
        output_activation: "auto" (tanh for images, none for vectors), "tanh" or "none".
        skip_nonfinite_critic_steps: skip a critic step whose loss is NaN or infinite (no update,
            optimiser state untouched; counted in `train/skipped_critic_steps`) instead of stopping.
            A non-finite generator loss always stops training.
        channels_last, compile: speed options (`GenerativeModule.configure_model`): image networks in
            channels-last memory order; each network compiled with `torch.compile`.
        generator, critic: networks to use instead of the builders' (generator (B, latent_dim) ->
            (B, *data_shape), critic -> (B,)); not saved as hyperparameters: pass them again to
            `load_from_checkpoint`.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 16,
        divergence: str = "jensen_shannon",
        generator_loss: GeneratorLoss = "non_saturating",
        lipschitz: LipschitzMethod = "none",
        gp_weight: float = 10.0,
        lambda_scale: float = 1.0,
        n_critic: int = 1,
        prior: PriorName = "gaussian",
        width: int = 64,
        generator_channels: list[int] | None = None,
        critic_width: int = 64,
        critic_channels: list[int] | None = None,
        critic_depth: int = 3,
        critic_activation: CriticActivation = "leaky_relu",
        lr: float = 2e-4,
        critic_lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        output_activation: OutputActivation = "auto",
        upsample: Upsample = "transposed",
        init: Init = "default",
        skip_nonfinite_critic_steps: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        generator: nn.Module | None = None,
        critic: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        self.save_hyperparameters(ignore=["generator", "critic"])
        check_choice("lipschitz", lipschitz, LIPSCHITZ_METHODS)
        check_choice("generator_loss", generator_loss, GENERATOR_LOSSES)
        if n_critic < 1 or gp_weight < 0:
            raise ValueError(f"Need n_critic >= 1 and gp_weight >= 0, got {n_critic} and {gp_weight}.")
        self.divergence = get_divergence(divergence, lambda_scale)  # lambda f
        self.decoder = generator if generator is not None else build_decoder(
            self.data_shape, latent_dim, width, generator_channels, self.resolve_output_activation(output_activation),
            upsample=upsample, init=init,
        )
        critic = critic if critic is not None else build_critic(
            self.data_shape, critic_width, critic_channels, critic_depth, spectral_norm=lipschitz == "spectral_norm",
            activation=critic_activation, init=init,
        )
        self.critic = Critic(critic, self.divergence, self.data_shape, gp_weight if lipschitz == "gradient_penalty" else 0.0)
        self._epoch_bound: float | None = None

    def generator_loss(self, fake: Tensor) -> Tensor:
        """Saturating: descend -E_fake[(lambda f)*(h)] (the objective's G-dependent term);
        non-saturating: descend -E_fake[h]."""
        return self.critic.generator_loss(fake, self.hparams.generator_loss)

    # ---- training -----------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = self.batch_data(batch)  # (B, *data_shape)
        opt_generator, opt_critic = self.optimizers()
        hp = self.hparams

        def critic_step() -> tuple[Tensor, dict[str, Tensor]]:  # fresh fakes each step, the same real batch
            fake = self.decode(self.sample_latent(real.shape[0])).detach()
            loss, objective, grad_norm = self.critic.loss(real, fake)
            values = {"train/critic_objective": objective, "train/critic_loss": loss}
            return loss, values if grad_norm is None else {**values, "train/gradient_norm": grad_norm}

        self.adversary_steps(opt_critic, critic_step, hp.n_critic, "train/critic_loss")

        self.toggle_optimizer(opt_generator)
        generator_loss = self.generator_loss(self.decode(self.sample_latent(real.shape[0])))
        self.guarded_step(opt_generator, {"train/generator_loss": generator_loss}, {"train/generator_loss": generator_loss})
        self.untoggle_optimizer(opt_generator)

        values = self.finish_step()
        self.log_dict({k: v.detach() for k, v in values.items()}, on_step=True, on_epoch=True)

    # ---- evaluation: the dual value and its certificate ----------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._certify_critic()

    def on_test_epoch_start(self) -> None:
        self._certify_critic()

    def _certify_critic(self) -> None:
        # The critic does not change during evaluation: one certificate per epoch.
        self._epoch_bound = self.critic.network_bound() if self.hparams.lipschitz != "none" else None

    def evaluation_step(self, split: str, batch: Any, batch_idx: int) -> None:
        real = self.batch_data(batch)
        fake = self.sample(real.shape[0])
        with torch.no_grad(), eval_mode(self.critic):
            objective = self.critic.objective(real, fake)
        self.log(f"{split}/critic_objective", objective, prog_bar=True, sync_dist=True)
        if self._epoch_bound is None:
            return
        self.log(f"{split}/lipschitz_estimate", self.critic.pair_lipschitz_estimate(real, fake), reduce_fx="max", sync_dist=True)
        self.log(f"{split}/lipschitz_bound", self.critic.lipschitz_bound(self._epoch_bound), sync_dist=True)
        self.log(f"{split}/dual_certified", float(is_dual_certified(self.divergence, self._epoch_bound)), sync_dist=True)
        if self.divergence.is_activation_1_lipschitz:
            self.log(f"{split}/dual_lower_bound", self.critic.certified_value(real, fake, self._epoch_bound), sync_dist=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [self.adam(self.decoder.parameters(), hp.lr, hp.betas), self.adam(self.critic.parameters(), hp.critic_lr, hp.betas)]
