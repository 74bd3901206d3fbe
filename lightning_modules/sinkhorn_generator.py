"""A generator trained by regularised optimal transport: the upper side of the chain (docs/theory.md 3.5).

The paper's chain GAN_{lambda f}(P_X, G; H_c) <= fWAE_{c,lambda}(P_X, G) <= W_c(P_X, P_G) ends with
W_c, and the cost of any feasible coupling lies above W_c. Minimising such a cost from above is the
third training objective beside the dual (the f-GAN critic, `fgan.py`) and the primal (the f-WAE
encoder, `wae.py`): a generator G is trained without critic or encoder, by descending an optimal
transport loss between a data batch x_1..x_N and samples y_j = G(z_j) (Genevay, Peyre, Cuturi 2018;
Feydy et al. 2019), computed by `transport.entropic.transport_loss`:

- objective="entropic": OT_eps(a, b) >= W_c(a, b), an UPPER BOUND on W_c and so on the f-WAE; over
  random batches E OT_eps >= E W_c(a, b) >= W_c(P_X, P_G) (joint convexity). It is biased (its
  minimiser over b is a blurred, shrunk copy of a; the bias vanishes as eps -> 0). Logged as
  `train/ot_entropic`, `val/ot_entropic`.
- objective="sinkhorn_divergence": the debiased S_eps: zero at b = a, better gradients, no
  shrinking bias, but NOT a bound on W_c (it can be far below it). Logged as
  `train/sinkhorn_divergence`, `val/sinkhorn_divergence`, never as a bound.

`val/objective_is_upper_bound` is 1 for "entropic" and 0 for "sinkhorn_divergence", so the logs say
whether the training curve may be read as a bound. The certified bracket val/w_lower <= W_c <=
val/w_upper between held-out data and samples comes from `callbacks.SinkhornBoundCallback`, which
the configs attach (it reads the module's cost).

Matching data and samples (`transport_batch_size` = N): each training step solves an N x N
problem between the FIRST N points of the loader batch (the loader shuffles, so they are a
uniformly random subset of it) and N fresh samples of G. With N = None the whole loader batch is
used. A loader batch with B < N is refused (set the datamodule's batch_size >= N), except the short
last batch of an epoch, which is matched with B samples.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_modules.base import GenerativeModule
from lightning_modules.networks import Init, OutputActivation, Upsample, build_decoder
from maths.choices import check_choice
from maths.priors import PriorName
from transport.entropic import ENTROPIC_COSTS, OBJECTIVES, EntropicCost, Objective, blur_to_eps, transport_loss

# The honest log names: OT_eps is an upper bound on W_c, the debiased divergence is not.
LOG_NAMES: dict[str, str] = {"entropic": "ot_entropic", "sinkhorn_divergence": "sinkhorn_divergence"}
IS_UPPER_BOUND: dict[str, bool] = {"entropic": True, "sinkhorn_divergence": False}


class SinkhornGenerator(GenerativeModule):
    """A generator trained by minimising an entropic OT loss to the data (see the module docstring).

    Args:
        data_shape: shape of one sample, (C, H, W) or (D,); the CLI links it from the datamodule.
        latent_dim: dimension of the generator's input z ~ prior.
        cost: "l2" (|x - y| on flattened samples; the default: a metric, as the chain needs, and a
            matching error across modes pulls a sample with unit force, not with the square of
            the distance) or "l2sq" (|x - y|^2).
        objective: "entropic" (OT_eps, debias off: an upper bound on W_c, logged as
            `train/ot_entropic`) or "sinkhorn_divergence" (debiased: better gradients, NOT a bound,
            logged as `train/sinkhorn_divergence`).
        blur: blur radius in data units; temperature eps = 2 blur^2 (l2sq) or blur (l2).
        scaling: geomloss's eps-scaling ratio in (0, 1); closer to 1 is more accurate and slower
            (about log(diameter / blur) / log(1 / scaling) Sinkhorn steps per loss).
        transport_batch_size: N, the size of each step's transport problem (None: the loader
            batch); N generated samples against the first N points of the loader batch.
        width, generator_channels, output_activation: the generator, as in the other models
            (`build_decoder`; "auto" = tanh for images, none for vectors).
        upsample: how the image generator doubles its grid, "transposed" or "resize"
            (`networks.ConvDecoder`).
        init: "default" (PyTorch's) or "dcgan" (`networks.init_weights`).
        lr, betas: Adam settings of the generator.
        final_lr: None (constant lr) or the lr reached at the last step by an exponential decay
            from `lr` over the run (the minibatch matching is noisy: a decay averages it out).
        val_seed: seed of the latent codes of the validation samples (the same every epoch).
        channels_last, compile: speed options (`GenerativeModule.configure_model`): image networks in
            channels-last memory order; each network compiled with `torch.compile`.
        generator: a network to use instead of the builder's ((B, latent_dim) -> (B, *data_shape));
            not saved as a hyperparameter: pass it again to `load_from_checkpoint`.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 16,
        cost: EntropicCost = "l2",
        objective: Objective = "entropic",
        blur: float = 0.05,
        scaling: float = 0.5,
        transport_batch_size: int | None = None,
        prior: PriorName = "gaussian",
        width: int = 64,
        generator_channels: list[int] | None = None,
        lr: float = 1e-3,
        final_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        output_activation: OutputActivation = "auto",
        upsample: Upsample = "transposed",
        init: Init = "default",
        val_seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        generator: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        self.save_hyperparameters(ignore=["generator"])
        check_choice("cost", cost, ENTROPIC_COSTS)
        check_choice("objective", objective, OBJECTIVES)
        self.eps = blur_to_eps(blur, cost)
        if not 0 < scaling < 1:
            raise ValueError(f"scaling is geomloss's ratio between successive blur radii, in (0, 1), got {scaling}.")
        if transport_batch_size is not None and transport_batch_size < 1:
            raise ValueError(f"transport_batch_size must be a positive integer or None (the loader batch), "
                             f"got {transport_batch_size}.")
        if not lr > 0 or (final_lr is not None and not final_lr > 0):
            raise ValueError(f"lr and final_lr must be positive (final_lr None: constant lr), got {lr} and {final_lr}.")
        self.decoder = generator if generator is not None else build_decoder(
            self.data_shape, latent_dim, width, generator_channels, self.resolve_output_activation(output_activation),
            upsample=upsample, init=init,
        )
        self.log_name = LOG_NAMES[objective]
        self.objective_is_upper_bound = IS_UPPER_BOUND[objective]

    # ---- the objective ------------------------------------------------------------------------

    def transport_objective(self, real: Tensor, fake: Tensor) -> Tensor:
        """The training objective between a data batch (n, *data_shape) and samples (m, *data_shape):
        OT_eps (>= W_c) or the Sinkhorn divergence (not a bound), in the module's cost."""
        hp = self.hparams
        return transport_loss(real, fake, hp.cost, hp.blur, hp.objective, hp.scaling)

    def describe_objective(self) -> str:
        """One sentence saying what the training objective is and whether it bounds W_c."""
        hp = self.hparams
        if self.objective_is_upper_bound:
            return (f"objective 'entropic': OT_eps with debias off (cost {hp.cost}, eps = {self.eps:.4g}), an upper "
                    f"bound on W_c (hence on the f-WAE), logged as {self.log_name}")
        return (f"objective 'sinkhorn_divergence': the debiased Sinkhorn divergence (cost {hp.cost}, eps = "
                f"{self.eps:.4g}), NOT a bound on W_c (it can be far below it), logged as {self.log_name}")

    def transport_batch(self, real: Tensor, batch_idx: int) -> Tensor:
        """The data side of a step's transport problem: the first N points of the loader batch."""
        size = self.hparams.transport_batch_size
        if size is None or real.shape[0] >= size:
            return real if size is None else real[:size]
        num_batches = self.trainer.num_training_batches if self._trainer is not None else float("inf")
        if batch_idx < num_batches - 1:  # only the last batch of an epoch may be short
            raise ValueError(
                f"SinkhornGenerator matches transport_batch_size={size} generated samples with as many data points "
                f"from one loader batch, but the loader gave a batch of {real.shape[0]}. Set the datamodule's "
                f"batch_size to at least {size} (--data.init_args.batch_size {size}) or lower "
                f"transport_batch_size (None uses the loader batch as it is)."
            )
        return real

    # ---- training -----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        rank_zero_info(f"SinkhornGenerator: {self.describe_objective()}.")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = self.transport_batch(self.batch_data(batch), batch_idx)  # (N, *data_shape)
        optimizer = self.optimizers()
        fake = self.decode(self.sample_latent(real.shape[0]))  # (N, *data_shape)
        loss = self.transport_objective(real, fake)
        self.guarded_step(optimizer, {f"train/{self.log_name}": loss})
        self.finish_step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log(f"train/{self.log_name}", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = self.adam(self.decoder.parameters(), hp.lr, hp.betas)
        if hp.final_lr is None:
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError("final_lr decays the lr over the run, so the run needs a length: set trainer.max_epochs "
                             "or trainer.max_steps, or final_lr None (constant lr).")
        steps = max(1, int(steps))
        rate = (hp.final_lr / hp.lr) ** (1.0 / steps)  # lr * rate^step reaches final_lr at the last step
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rate ** min(step, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation: the objective on held-out batches ----------------------------------------

    def evaluation_step(self, split: str, batch: Any, batch_idx: int) -> None:
        real = self.batch_data(batch)  # (B, *data_shape)
        size = self.hparams.transport_batch_size
        real = real if size is None else real[:size]
        fake = self.sample(real.shape[0])  # seeded per batch and rank by `evaluation_context`
        value = self.transport_objective(real, fake)
        self.log(f"{split}/{self.log_name}", value, prog_bar=True, sync_dist=True, batch_size=real.shape[0])
        self.log(f"{split}/objective_is_upper_bound", float(self.objective_is_upper_bound), sync_dist=True)
