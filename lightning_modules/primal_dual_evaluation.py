"""PrimalDual's evaluation (SPEC section 4): the primal, the dual and the gap as exact epoch
aggregates over batches and ranks, and the critic-free Monte Carlo D_f of the epoch's codes.

Each validation / test step adds per-sample sums of every term (reconstruction cost, the latent
critic's two terms, the data critic's raw and certified terms) to one float64 vector; the epoch end
reduces it over ranks once and divides by the count, so `val/gap` is exactly `val/primal - val/dual`
and every rank logs the same values. A Gaussian encoder's (mean, log_var) are kept for the Monte
Carlo estimate of D_f for the mixture of all the epoch's codes (gathered from every rank).

The mixin reads the model's networks and hyperparameters (`encoder`, `decode`, `sample`, `critic`,
`latent_critic_output`, `latent_divergence`, `data_divergence`, `hparams`); `PrimalDual` is its
only user.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.base import eval_mode
from lightning_modules.latent_divergence import gaussian_code_parameters, monte_carlo_divergence, reparameterize
from lightning_modules.losses import cost as pointwise_cost

MC_SEED = 0  # the Monte Carlo prior draws are the same every epoch: epochs differ by the model only

# Per-epoch sums accumulated in validation / test (one float64 vector, reduced across ranks once).
_SUMS = (
    "recon", "latent_encoded", "latent_prior", "dual_real", "dual_fake", "certified_real", "certified_fake", "count"
)


class PrimalDualEvaluationMixin:
    """Validation and test hooks of `PrimalDual` (see the module docstring)."""

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    @property
    def _f_at_one(self) -> float:
        """f(1): 0 for every row but gan (-log 4); D_f(Q || P) >= f(1) always (Jensen)."""
        return float(self.latent_divergence.f(torch.tensor(1.0, dtype=torch.float64)))

    @property
    def _monte_carlo_available(self) -> bool:
        return self.hparams.encoder_type == "gaussian" and self.hparams.prior == "gaussian"

    def _start_evaluation(self) -> None:
        # The critic does not change during evaluation: one certificate per epoch.
        self._epoch_bound = self._network_bound()
        self._sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        self._codes = []

    def _evaluation_step(self, split: str, batch: Any) -> None:
        real = self.batch_data(batch)  # (B, *data_shape)
        batch_size = real.shape[0]
        out = self.encoder(real)
        if self.hparams.encoder_type == "gaussian":
            mean, log_var = gaussian_code_parameters(out)  # (B, d_z) each
            z = reparameterize(mean, log_var)
            if self._monte_carlo_available:
                self._codes.append((mean.detach(), log_var.detach()))
        else:
            z = out  # (B, d_z)
        recon = pointwise_cost(real, self.decode(z), self.hparams.cost)  # (B,)
        z_prior = self.sample_latent(batch_size).to(z.dtype)
        latent_encoded = self.latent_divergence.activation(self.latent_critic_output(z))  # (B,)
        latent_prior = self.latent_divergence.conjugate_of_activation(self.latent_critic_output(z_prior))  # (B,)

        fake = self.sample(batch_size)  # (B, *data_shape)
        with eval_mode(self.critic):
            v_real, v_fake = self.critic(real), self.critic(fake)  # (B,), (B,): the networks alone
            scale, offset = max(1.0, self._epoch_bound), self.data_divergence.neutral_output
            terms = [
                recon,
                latent_encoded,
                latent_prior,
                self.data_divergence.activation(v_real + offset),
                self.data_divergence.conjugate_of_activation(v_fake + offset),
                self.data_divergence.activation(v_real / scale + offset),
                self.data_divergence.conjugate_of_activation(v_fake / scale + offset),
            ]
            count = torch.tensor(batch_size, dtype=torch.float64, device=self._sums.device)
            self._sums += torch.stack([t.double().sum() for t in terms] + [count])
            if self.hparams.lipschitz != "none":
                estimate = self.pair_lipschitz_estimate(real, fake)
                self.log(f"{split}/lipschitz_estimate", estimate, reduce_fx="max", sync_dist=True)

    def _end_evaluation(self, split: str) -> None:
        sums = self.trainer.strategy.reduce(self._sums, reduce_op="sum") if self._sums is not None else None
        if sums is None or sums[-1] == 0:
            return
        recon, latent_encoded, latent_prior, dual_real, dual_fake, cert_real, cert_fake = sums[:-1] / sums[-1]
        # Both T's estimate and f(1) (the value of the constant critic f'(1)) are lower estimates of
        # D_f >= f(1); keep the better one (a negative D_kl estimate only says T is worse than a constant).
        divergence_critic = torch.clamp(latent_encoded - latent_prior, min=self._f_at_one)
        dual = dual_real - dual_fake
        metrics = {
            f"{split}/recon": recon,
            f"{split}/latent_divergence_critic": divergence_critic,
            f"{split}/dual": dual,
        }
        divergence = divergence_critic
        if self._monte_carlo_available and self._codes:
            mean = torch.cat([m for m, _ in self._codes])  # (N, d_z)
            log_var = torch.cat([v for _, v in self._codes])
            if self.trainer.world_size > 1:  # the mixture over every rank's codes, the same on all ranks
                mean = self.all_gather(mean).reshape(-1, self.latent_dim)
                log_var = self.all_gather(log_var).reshape(-1, self.latent_dim)
            estimate = monte_carlo_divergence(
                self.latent_divergence,
                mean,
                log_var,
                self.hparams.mc_samples,
                self.hparams.prior,
                generator=torch.Generator().manual_seed(MC_SEED),
            )
            metrics[f"{split}/latent_divergence_mc"] = estimate.value
            metrics[f"{split}/latent_divergence_mc_std_error"] = estimate.std_error
            if self.hparams.primal_estimator == "monte_carlo":
                divergence = estimate.value.to(recon)
        self._codes = []
        primal = recon + self.hparams.lambda_ * divergence
        metrics[f"{split}/primal"] = primal
        metrics[f"{split}/gap"] = primal - dual
        bound = self._epoch_bound * self.data_divergence.activation_lipschitz
        metrics[f"{split}/lipschitz_bound"] = torch.tensor(bound, dtype=torch.float64)
        metrics[f"{split}/dual_certified"] = torch.tensor(float(self.is_dual_certified(bound)), dtype=torch.float64)
        if self.data_divergence.is_activation_1_lipschitz:
            metrics[f"{split}/dual_lower_bound"] = cert_real - cert_fake
        # Every rank holds the same values here; sync_dist keeps Lightning's epoch-level convention.
        shown = {f"{split}/{key}" for key in ("primal", "dual", "gap")}
        self.log_dict({k: v for k, v in metrics.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, sync_dist=True)
