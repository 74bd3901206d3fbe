"""The Wasserstein autoencoder family: WAE-MMD, WAE-GAN and the f-WAE (docs/theory.md 3.2, 3.3).

    fWAE_{c,lambda}(P_X, G) = inf_E  E_{P_X}[c(x, G(E(x)))] + lambda * D(Q_Z, P_Z),

with Q_Z = E#P_X the aggregated posterior and D one of
  - `mmd`: the unbiased MMD^2 between Q_Z and P_Z (WAE-MMD, Tolstikhin et al. 2018), kernel
    `imq` (summed over scales) or `rbf`;
  - `gan`: the WAE-GAN latent adversary: the registry's `gan` row, 2 JS(Q_Z, P_Z) - log 4,
    estimated by a latent critic, with the paper's non-saturating encoder loss;
  - `f`: the f-WAE: D_f(Q_Z || P_Z) for any registry row, estimated by a latent critic T
    through the variational form E_{Q_Z}[g_f(v)] - E_{P_Z}[f*(g_f(v))], which the critic
    ascends and the encoder descends.

The logged penalty is that estimate and `primal` = recon + lambda * penalty. With a
deterministic encoder on a finite sample Q_Z is discrete, so D_f(Q_Z || P_Z) is infinite for
unbounded f (kl and others): the critic's estimate then keeps growing with its capacity and
training time (docs/theory.md 4.2). Bounded rows (jensen_shannon, gan, total_variation) and MMD
do not have that problem, which is why they are the defaults.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.autoencoder import Autoencoder
from lightning_modules.critic import Critic
from lightning_modules.networks import Init, OutputActivation, Upsample, build_critic
from maths.choices import check_choice
from maths.divergences import get_divergence
from maths.dual import critic_output, dual_value
from maths.gaussian_codes import EncoderType
from maths.mmd import KernelName, check_kernel_name, mmd_unbiased
from maths.priors import PriorName, prior_variance
from transport.costs import CostName

LatentPenalty = Literal["mmd", "gan", "f"]
LATENT_PENALTIES: tuple[str, ...] = get_args(LatentPenalty)


class WAE(Autoencoder):
    """Wasserstein autoencoder with an MMD, GAN or f-divergence latent penalty.

    Args:
        data_shape: shape of one sample, (C, H, W) or (D,); the CLI links it from the datamodule.
        latent_dim: d_z.
        latent_penalty: "mmd", "gan" (WAE-GAN) or "f" (f-WAE with `divergence`).
        divergence: registry row for latent_penalty="f".
        kernel: MMD kernel, "imq" or "rbf", summed over the WAE paper's scales of C = 2 d_z sigma^2.
        lambda_: weight of the latent penalty.
        cost: reconstruction cost c, "l2sq" (WAE default), "l2" or "l1", summed over pixels.
        prior: P_Z, "gaussian", "sphere" or "cube".
        encoder_type: "deterministic" or "gaussian" (reparameterised N(mu(x), diag sigma^2(x))).
        width: base width of encoder / decoder (channels of the first conv, or MLP units).
        encoder_channels, decoder_channels: explicit conv channel lists (override `width`).
        critic_width, critic_depth: the latent critic MLP (gan and f penalties).
        n_critic: latent critic steps per autoencoder step.
        lr, critic_lr, betas: Adam settings of the autoencoder and of the latent critic.
        output_activation: "auto" (tanh for images in [-1, 1], none for vectors), "tanh", "none".
        upsample: how the image decoder doubles its grid, "transposed" or "resize"
            (`networks.ConvDecoder`).
        init: "default" (PyTorch's) or "dcgan" (`networks.init_weights`), for every network built here.
        skip_nonfinite_critic_steps: skip a latent critic step whose loss is NaN or infinite (no
            update, optimiser state untouched; counted in `train/skipped_critic_steps`) instead of
            stopping. A non-finite autoencoder loss always stops training.
        channels_last, compile: speed options (`GenerativeModule.configure_model`): image networks in
            channels-last memory order; each network compiled with `torch.compile`.
        encoder, decoder, latent_critic: networks to use instead of the builders' (not saved as
            hyperparameters: pass them again to `load_from_checkpoint`).
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 8,
        latent_penalty: LatentPenalty = "mmd",
        divergence: str = "jensen_shannon",
        kernel: KernelName = "imq",
        lambda_: float = 10.0,
        cost: CostName = "l2sq",
        prior: PriorName = "gaussian",
        encoder_type: EncoderType = "deterministic",
        width: int = 64,
        encoder_channels: list[int] | None = None,
        decoder_channels: list[int] | None = None,
        critic_width: int = 256,
        critic_depth: int = 3,
        n_critic: int = 1,
        lr: float = 1e-3,
        critic_lr: float = 5e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        output_activation: OutputActivation = "auto",
        upsample: Upsample = "transposed",
        init: Init = "default",
        skip_nonfinite_critic_steps: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        latent_critic: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior, cost, encoder_type, width, encoder_channels, decoder_channels,
                         output_activation, encoder, decoder, upsample, init)
        self.save_hyperparameters(ignore=["encoder", "decoder", "latent_critic"])
        check_kernel_name(kernel)
        check_choice("latent_penalty", latent_penalty, LATENT_PENALTIES)
        if lambda_ < 0 or n_critic < 1:
            raise ValueError(f"Need lambda_ >= 0 and n_critic >= 1, got {lambda_} and {n_critic}.")
        self.divergence = get_divergence("gan" if latent_penalty == "gan" else divergence)
        self.latent_critic = None
        if latent_penalty != "mmd":
            if latent_critic is None:
                latent_critic = build_critic((latent_dim,), critic_width, depth=critic_depth, init=init)
            self.latent_critic = Critic(latent_critic, self.divergence, (latent_dim,))

    # ---- the latent penalty -------------------------------------------------------------------

    def latent_penalty(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(estimate of D(Q_Z, P_Z), the encoder's loss for it) on codes z (B, d_z)."""
        z_prior = self.sample_latent(z.shape[0]).to(z.dtype)  # (B, d_z)
        if self.latent_critic is None:
            base_scale = 2.0 * self.latent_dim * prior_variance(self.prior, self.latent_dim)
            mmd = mmd_unbiased(z, z_prior, self.hparams.kernel, base_scale=base_scale)
            return mmd, mmd
        raw_encoded, raw_prior = self.latent_critic(z), self.latent_critic(z_prior)  # (B,), (B,)
        estimate = dual_value(self.divergence, raw_encoded, raw_prior)
        if self.hparams.latent_penalty == "gan":
            # Non-saturating encoder loss of the WAE paper: -log(1 - D(E(x))) with D = sigmoid(v).
            return estimate, F.softplus(critic_output(self.divergence, raw_encoded)).mean()
        return estimate, estimate

    # ---- training -----------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.batch_data(batch)  # (B, *data_shape)
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        z = self.encode(x)  # (B, d_z)
        if self.latent_critic is not None:

            def critic_step() -> tuple[Tensor, dict[str, Tensor]]:  # T ascends its estimate of D(Q_Z, P_Z)
                objective = self.latent_critic.objective(z.detach(), self.sample_latent(z.shape[0]).to(z.dtype))
                return -objective, {"train/critic_objective": objective}

            self.adversary_steps(optimizers[1], critic_step, self.hparams.n_critic, "train/latent_critic_loss")

        recon = self.reconstruction_cost(x, self.decode(z))
        penalty, penalty_loss = self.latent_penalty(z)
        loss = recon + self.hparams.lambda_ * penalty_loss
        self.guarded_step(opt_ae, {"train/autoencoder_loss": loss})
        values = self.finish_step()
        if values:
            self.log_dict({k: v.detach() for k, v in values.items()}, on_step=False, on_epoch=True)
        self._log_objective("train", recon, penalty, prog_bar=False)
        return loss.detach()

    def evaluation_step(self, split: str, batch: Any, batch_idx: int) -> None:
        x = self.batch_data(batch)
        z = self.encode(x)
        recon = self.reconstruction_cost(x, self.decode(z))
        penalty, _ = self.latent_penalty(z)
        self._log_objective(split, recon, penalty, prog_bar=True)

    def _log_objective(self, split: str, recon: Tensor, penalty: Tensor, prog_bar: bool) -> None:
        primal = recon + self.hparams.lambda_ * penalty
        values = {f"{split}/recon": recon, f"{split}/latent_penalty": penalty, f"{split}/primal": primal}
        on_step = split == "train"
        self.log_dict(values, on_step=on_step, on_epoch=True, prog_bar=prog_bar, sync_dist=not on_step)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        optimizers = [self.adam(self.autoencoder_parameters(), hp.lr, hp.betas)]
        if self.latent_critic is not None:
            optimizers.append(self.adam(self.latent_critic.parameters(), hp.critic_lr, hp.betas))
        return optimizers
