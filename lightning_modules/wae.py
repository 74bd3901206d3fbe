"""The Wasserstein autoencoder family: WAE-MMD, WAE-GAN and the f-WAE (SPEC section 4).

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
training time (SPEC section 4). Bounded rows (jensen_shannon, gan, total_variation) and MMD do
not have that problem, which is why they are the defaults.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import GenerativeModule
from lightning_modules.divergences import get_divergence
from lightning_modules.losses import CostName, KernelName, PriorName, check_choice, check_cost_name, check_kernel_name
from lightning_modules.losses import cost as pointwise_cost
from lightning_modules.losses import mmd_unbiased, prior_variance
from lightning_modules.networks import build_critic, build_decoder, build_encoder


class WAE(GenerativeModule):
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
        skip_nonfinite_critic_steps: skip a latent critic step whose loss is NaN or infinite (no
            update, optimiser state untouched; counted in `train/skipped_critic_steps`) instead of
            stopping. A non-finite autoencoder loss always stops training.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 8,
        latent_penalty: Literal["mmd", "gan", "f"] = "mmd",
        divergence: str = "jensen_shannon",
        kernel: KernelName = "imq",
        lambda_: float = 10.0,
        cost: CostName = "l2sq",
        prior: PriorName = "gaussian",
        encoder_type: Literal["deterministic", "gaussian"] = "deterministic",
        width: int = 64,
        encoder_channels: list[int] | None = None,
        decoder_channels: list[int] | None = None,
        critic_width: int = 256,
        critic_depth: int = 3,
        n_critic: int = 1,
        lr: float = 1e-3,
        critic_lr: float = 5e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        output_activation: Literal["auto", "tanh", "none"] = "auto",
        skip_nonfinite_critic_steps: bool = False,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        self.save_hyperparameters()
        check_cost_name(cost)
        check_kernel_name(kernel)
        check_choice("latent_penalty", latent_penalty, ("mmd", "gan", "f"))
        check_choice("encoder_type", encoder_type, ("deterministic", "gaussian"))
        if lambda_ < 0 or n_critic < 1:
            raise ValueError(f"Need lambda_ >= 0 and n_critic >= 1, got {lambda_} and {n_critic}.")
        self.divergence = get_divergence("gan" if latent_penalty == "gan" else divergence)

        code_size = latent_dim * (2 if encoder_type == "gaussian" else 1)
        self.encoder = build_encoder(self.data_shape, code_size, width, encoder_channels)
        self.decoder = build_decoder(
            self.data_shape, latent_dim, width, decoder_channels, self.resolve_output_activation(output_activation)
        )
        self.latent_critic = (
            build_critic((latent_dim,), critic_width, depth=critic_depth) if latent_penalty != "mmd" else None
        )

    # ---- public API ---------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """A latent code of each sample: E(x), or a reparameterised draw for a gaussian encoder.
        (B, *data_shape) -> (B, latent_dim)."""
        out = self.encoder(x)  # (B, d_z) or (B, 2 d_z)
        if self.hparams.encoder_type == "deterministic":
            return out
        mean, log_var = out.chunk(2, dim=1)
        return mean + torch.exp(0.5 * log_var.clamp(-10.0, 5.0)) * torch.randn_like(mean)

    def latent_critic_output(self, z: Tensor) -> Tensor:
        """T's network plus the constant v0 with g_f(v0) = f'(1) (1 for kl, else 0), so an untrained
        latent critic sits at the optimum for Q_Z = P_Z. (B, d_z) -> (B,)."""
        return self.latent_critic(z) + self.divergence.neutral_output

    def latent_penalty(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(estimate of D(Q_Z, P_Z), the encoder's loss for it) on codes z (B, d_z)."""
        z_prior = self.sample_latent(z.shape[0]).to(z.dtype)  # (B, d_z)
        if self.latent_critic is None:
            base_scale = 2.0 * self.latent_dim * prior_variance(self.prior, self.latent_dim)
            mmd = mmd_unbiased(z, z_prior, self.hparams.kernel, base_scale=base_scale)
            return mmd, mmd
        v_encoded, v_prior = self.latent_critic_output(z), self.latent_critic_output(z_prior)  # (B,), (B,)
        estimate = self.divergence.variational_estimate(v_encoded, v_prior)
        if self.hparams.latent_penalty == "gan":
            # Non-saturating encoder loss of the WAE paper: -log(1 - D(E(x))) with D = sigmoid(v).
            return estimate, F.softplus(v_encoded).mean()
        return estimate, estimate

    def reconstruction_cost(self, x: Tensor, x_rec: Tensor) -> Tensor:
        """E c(x, G(E(x))) over the batch."""
        return pointwise_cost(x, x_rec, self.hparams.cost).mean()

    # ---- training -----------------------------------------------------------------------------

    def _critic_step(self, z: Tensor, optimizer: Any) -> Tensor | None:
        """One ascent step of the latent critic on the variational estimate; returns it (None when
        the step was skipped for a non-finite loss)."""
        z_prior = self.sample_latent(z.shape[0]).to(z.dtype)
        objective = self.divergence.variational_estimate(self.latent_critic_output(z), self.latent_critic_output(z_prior))
        if not self.check_finite("train/latent_critic_loss", -objective, critic=True):
            return None
        optimizer.zero_grad()
        self.manual_backward(-objective)
        optimizer.step()
        return objective.detach()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.batch_data(batch)  # (B, *data_shape)
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        z = self.encode(x)  # (B, d_z)
        if self.latent_critic is not None:
            objectives = [self._critic_step(z.detach(), optimizers[1]) for _ in range(self.hparams.n_critic)]
            done = [objective for objective in objectives if objective is not None]
            if done:
                self.log("train/critic_objective", done[-1], on_step=False, on_epoch=True)
            self.log_skipped_critic_steps(len(objectives) - len(done))

        recon = self.reconstruction_cost(x, self.decode(z))
        penalty, penalty_loss = self.latent_penalty(z)
        loss = recon + self.hparams.lambda_ * penalty_loss
        self.check_finite("train/autoencoder_loss", loss)
        opt_ae.zero_grad()
        self.manual_backward(loss)
        opt_ae.step()

        self._log_objective("train", recon, penalty, prog_bar=False)
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_eval("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_eval("test", batch)

    def _shared_eval(self, split: str, batch: Any) -> None:
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
        betas = tuple(self.hparams.betas)
        ae_params = [*self.encoder.parameters(), *self.decoder.parameters()]
        optimizers = [torch.optim.Adam(ae_params, lr=self.hparams.lr, betas=betas)]
        if self.latent_critic is not None:
            optimizers.append(torch.optim.Adam(self.latent_critic.parameters(), lr=self.hparams.critic_lr, betas=betas))
        return optimizers

