"""What every generative model of the project shares: shapes, the latent prior, `sample`, the
adversary's update loop, and the hooks that keep a run safe (`reliability.py`, `rng.py`).

Subclasses build `self.decoder` (the generator G: Z -> X) in their `__init__`. Callbacks rely
only on `sample(num_samples)` (and `encode` / `decode` where a model has an encoder), so any
LightningModule with those methods works with them.

- `check_finite(name, loss)` before every optimiser step: a NaN or infinite loss stops training
  (`NonFiniteError`, naming the step and the loss) before any weight changes, so the last
  checkpoint on disk is the last good one; critic steps may be skipped instead
  (`skip_nonfinite_critic_steps`). Under DDP the ranks take each decision together.
- Under DDP every process starts from the same seed, so rank r > 0 reseeds torch at `setup`:
  ranks draw different latent codes (rank 0 keeps a one-process run's stream); evaluation starts
  from rank 0's batch-norm statistics on every rank (the model rank 0 checkpoints).
- Checkpoints carry the random states, restored at the first resumed training epoch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from lightning_modules.networks import check_data_shape, is_image_shape
from lightning_modules.reliability import NonFiniteError, check_checkpoint_fits, check_finite_weights, nonfinite_message
from lightning_modules.rng import collect_rng_states, seed_rank, set_rng_states
from maths.layers import eval_mode
from maths.priors import check_prior_name, sample_prior

Values = dict[str, Tensor]


class GenerativeModule(L.LightningModule):
    """Base class: data_shape, latent_dim, prior, `decode`, `sample`, batch checks, adversary steps."""

    decoder: nn.Module

    def __init__(self, data_shape: Sequence[int], latent_dim: int, prior: str) -> None:
        super().__init__()
        self.data_shape = check_data_shape(data_shape)
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}.")
        check_prior_name(prior)
        self.latent_dim = int(latent_dim)
        self.prior = prior
        # Manual optimisation throughout: adversarial models step several optimisers per batch.
        self.automatic_optimization = False
        self._rng_states_to_restore: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        # Denormal floats in early convolution gradients slow CPU training by an order of magnitude;
        # flushing them to zero changes no result at float32 precision. Process-wide; no effect on GPUs.
        torch.set_flush_denormal(True)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            seed_rank(trainer.global_rank)

    def resolve_output_activation(self, output_activation: str) -> str:
        """"auto": tanh for images (datamodules scale them to [-1, 1]), none for vectors."""
        if output_activation == "auto":
            return "tanh" if is_image_shape(self.data_shape) else "none"
        return output_activation

    # ---- sampling -----------------------------------------------------------------------------

    def sample_latent(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Latent codes from the prior P_Z, drawn on the module's device in its dtype. -> (num_samples, latent_dim)."""
        device = generator.device if generator is not None else self.device
        z = sample_prior(self.prior, num_samples, self.latent_dim, generator=generator, device=device)
        return z.to(device=self.device, dtype=self.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """G(z). (B, latent_dim) -> (B, *data_shape)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decode expects codes of shape (B, {self.latent_dim}), got {tuple(z.shape)}.")
        return self.decoder(z)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw (num_samples, *data_shape) samples of P_G = G#P_Z in the data range.

        Runs the decoder in eval mode (batch norm uses its running statistics) and restores the
        previous mode afterwards.
        """
        with eval_mode(self.decoder):
            return self.decode(self.sample_latent(num_samples, generator))

    def batch_data(self, batch: Any) -> Tensor:
        """The data tensor of a batch ((x, y) tuples give x), checked against data_shape."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.data_shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} was built for data of shape {self.data_shape} (batch "
                f"(B, {', '.join(map(str, self.data_shape))})), but got a batch of shape {got}. "
                "Build the model with the datamodule's dims (the CLI links data.dims to "
                "model.data_shape) or resize the data."
            )
        return x

    # ---- training -----------------------------------------------------------------------------

    def adversary_steps(
        self, optimizer: Any, step_loss: Callable[[], tuple[Tensor, Values]], steps: int, name: str
    ) -> tuple[Values, int]:
        """`steps` updates of an adversary (a critic) with `optimizer`, each descending the loss of
        `step_loss()` -> (loss, values to log). A non-finite loss stops training, or skips the step
        when `skip_nonfinite_critic_steps` is set. Returns (the values of the last step taken, the
        number of steps skipped). Only the adversary's parameters take gradients meanwhile."""
        values, skipped = {}, 0
        self.toggle_optimizer(optimizer)
        for _ in range(steps):
            loss, step_values = step_loss()
            if not self.check_finite(name, loss, critic=True):
                skipped += 1  # no backward, no step: the adversary and its optimiser state as they were
                continue
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            values = step_values
        self.untoggle_optimizer(optimizer)
        return values, skipped

    def check_finite(self, name: str, loss: Tensor, critic: bool = False) -> bool:
        """Whether `loss` is finite (on every rank); call it before the loss's backward and step.

        A non-finite loss raises `NonFiniteError` ("step 1234: train/critic_loss is nan ...")
        before any weight changes. A critic loss (`critic=True`) of a module whose hyperparameter
        `skip_nonfinite_critic_steps` is true returns False instead: the caller then skips that
        step and counts it. Under DDP the ranks agree through one all-reduce.
        """
        finite = bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        skippable = critic and bool(self.hparams.get("skip_nonfinite_critic_steps", False))
        if finite or skippable:
            return finite
        raise NonFiniteError(nonfinite_message(self, name, loss, critic))

    def log_skipped_critic_steps(self, count: int) -> None:
        """Log `train/skipped_critic_steps` (summed over the epoch) when skipping is enabled.
        Every rank skips the same steps (`check_finite` agrees across ranks), so no sync is needed."""
        if self.hparams.get("skip_nonfinite_critic_steps", False):
            self.log("train/skipped_critic_steps", float(count), on_step=False, on_epoch=True, reduce_fx="sum")

    # ---- checkpoints, random states, DDP buffers -----------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write non-finite weights, and store the random states with the weights: the
        models draw latent codes from them, so a resumed run needs them to replay an uninterrupted one."""
        check_finite_weights(checkpoint, self.global_step)
        # Only rank 0's states reach the file; a resumed DDP run reseeds ranks r > 0 from them.
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_epoch_start(self) -> None:
        # Restored here, not at load time: the sanity-check validation of a resumed fit draws
        # samples between loading and the first epoch, which the uninterrupted run did not.
        if self._rng_states_to_restore is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None
            if self.trainer.world_size > 1:
                seed_rank(self.trainer.global_rank)

    def on_validation_start(self) -> None:
        self.copy_buffers_from_rank_zero()

    def on_test_start(self) -> None:
        self.copy_buffers_from_rank_zero()

    def copy_buffers_from_rank_zero(self) -> None:
        """Under DDP, give every rank rank 0's buffers (batch-norm running statistics).

        DDP copies rank 0's buffers at the start of each training forward, but each rank then
        updates them with its own batch, so they differ when evaluation starts: without this every
        rank would evaluate, and sample from, a slightly different model than the one rank 0
        checkpoints. (With --trainer.sync_batchnorm true on GPUs they already agree.)
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        for buffer in self.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
