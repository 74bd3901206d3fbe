"""What every generative model of the project shares: shapes, the latent prior, `sample`.

Subclasses build `self.decoder` (the generator G: Z -> X) in their `__init__`. Callbacks rely
only on `sample(num_samples)` (and `encode` / `decode` where a model has an encoder), so any
LightningModule with those methods works with them.

Reliability (SPEC sections 8 and 9), shared by the models:
- `check_finite(name, loss)` before every optimiser step: a NaN or infinite loss stops training
  (`NonFiniteError`, naming the step and the loss) before any weight changes, so the last
  checkpoint on disk is the last good one; critic steps may be skipped instead
  (`skip_nonfinite_critic_steps` on the adversarial models). A checkpoint is never written with
  non-finite weights. Under DDP the ranks take each decision together (one all-reduce).
- Under DDP every process starts from the same seed, so rank r > 0 reseeds torch at `setup`:
  ranks draw different latent codes (rank 0 keeps a one-process run's stream); evaluation starts
  from rank 0's batch-norm statistics on every rank (the model rank 0 checkpoints).
- Checkpoints carry the random states, restored at the first resumed training epoch.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lightning_modules.losses import check_prior_name, sample_prior
from lightning_modules.networks import check_data_shape, is_image_shape


def collect_rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python random states, as types that `torch.load(weights_only=True)`
    accepts (tensors, ints, lists), so that checkpoints stay loadable without trusting pickles."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class NonFiniteError(FloatingPointError):
    """A training loss (or a weight about to be checkpointed) is NaN or infinite (SPEC 9)."""


def seed_rank(rank: int) -> None:
    """Give DDP rank `rank` its own torch random stream (CPU and CUDA).

    Every process of a DDP run is seeded alike (`seed_everything`), so without this all ranks
    draw the same latent codes and the extra processes add no new samples. Rank 0 keeps its
    stream (the one a one-process run draws); rank r > 0 reseeds with s + r, s drawn from the
    common stream, so the streams are distinct and still a function of the run's seed.
    """
    if rank > 0:
        base = int(torch.randint(0, 2**62, (1,)))  # (1,): the same value on every rank
        torch.manual_seed(base + rank)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block; afterwards every submodule gets its own previous
    mode back (a submodule kept in eval mode on purpose stays so)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class GenerativeModule(L.LightningModule):
    """Base class: data_shape, latent_dim, prior, `decode`, `sample`, batch checks."""

    decoder: torch.nn.Module

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
        # Denormal floats (below 1.2e-38) in early convolution gradients slowed CPU training of the
        # digits WAE 20x (11.2 s vs 0.54 s for 3 epochs); flushing them to zero changes no result
        # at float32 precision. The setting is process-wide; it has no effect on GPUs.
        torch.set_flush_denormal(True)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            seed_rank(trainer.global_rank)

    def resolve_output_activation(self, output_activation: str) -> str:
        """"auto": tanh for images (datamodules scale them to [-1, 1]), none for vectors."""
        if output_activation == "auto":
            return "tanh" if is_image_shape(self.data_shape) else "none"
        return output_activation

    def sample_latent(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Latent codes from the prior P_Z on the module's device and in its dtype. -> (num_samples, latent_dim)."""
        z = sample_prior(self.prior, num_samples, self.latent_dim, generator=generator)
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

    # ---- reliability: non-finite losses, checkpoints, random states --------------------------

    def check_finite(self, name: str, loss: Tensor, critic: bool = False) -> bool:
        """Whether `loss` is finite (on every rank); call it before the loss's backward and step.

        A non-finite loss raises `NonFiniteError` ("step 1234: train/critic_loss is nan ...")
        before any weight changes. A critic loss (`critic=True`) of a module whose hyperparameter
        `skip_nonfinite_critic_steps` is true returns False instead: the caller then skips that
        step (no backward, no optimiser step, so the optimiser state is untouched) and counts it.
        Under DDP the ranks agree through one all-reduce, so they all skip or all stop together.
        """
        finite = bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        skippable = critic and bool(self.hparams.get("skip_nonfinite_critic_steps", False))
        if finite or skippable:
            return finite
        raise NonFiniteError(self._nonfinite_message(name, loss, critic))

    def _nonfinite_message(self, name: str, loss: Tensor, critic: bool) -> str:
        values = loss.detach().float().flatten()
        bad = values[~torch.isfinite(values)]
        what = f"is {bad[0].item()}" if bad.numel() else "is not finite on another process"
        trainer = self._trainer
        saved = []
        for callback in getattr(trainer, "checkpoint_callbacks", []) if trainer is not None else []:
            path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            if path:
                saved.append(path)
        kept = (
            f"the last checkpoint, written before this step, is kept: {saved[0]} (resume with --ckpt_path)"
            if saved
            else "no checkpoint had been written yet in this run"
        )
        skip = (
            ", or set skip_nonfinite_critic_steps: true to skip isolated non-finite critic steps"
            if critic and "skip_nonfinite_critic_steps" in self.hparams
            else ""
        )
        epoch = f" (epoch {trainer.current_epoch})" if trainer is not None else ""
        return (
            f"step {self.global_step}: {name} {what}{epoch}. Training stopped before this step changed any "
            f"weight; {kept}. Fixes: lower the learning rates, check the data for NaN or infinite values, "
            f"keep the critic Lipschitz (spectral_norm or gradient_penalty){skip}."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write non-finite weights (the previous checkpoint stays the last good one), and
        store the random states (torch, CUDA, numpy, Python) with the weights: the models draw
        latent codes from them, so a resumed run needs them to replay an uninterrupted one."""
        bad = [
            name
            for name, value in checkpoint.get("state_dict", {}).items()
            if torch.is_floating_point(value) and not bool(torch.isfinite(value).all())
        ]
        if bad:
            raise NonFiniteError(
                f"step {self.global_step}: not writing a checkpoint, the weights {', '.join(bad[:3])}"
                f"{' and others' if len(bad) > 3 else ''} are not finite; earlier checkpoints are kept. Lower "
                "the learning rates or check the data for NaN or infinite values, then resume from the last good one."
            )
        # Only rank 0's states reach the file; a resumed DDP run reseeds ranks r > 0 from them.
        checkpoint["rng_states"] = collect_rng_states()

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

    def log_skipped_critic_steps(self, count: int) -> None:
        """Log `train/skipped_critic_steps` (summed over the epoch) when skipping is enabled.
        Every rank skips the same steps (`check_finite` agrees across ranks), so no sync is needed."""
        if self.hparams.get("skip_nonfinite_critic_steps", False):
            self.log("train/skipped_critic_steps", float(count), on_step=False, on_epoch=True, reduce_fx="sum")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights whose shapes do not fit this model (another latent_dim, data shape or
        width), with the model's sizes in the message instead of torch's per-layer error."""
        own = self.state_dict()
        trained = checkpoint.get("hyper_parameters") or {}
        # The trained sizes first: another data shape can change the layers' names (MLP vs. conv),
        # which no shape comparison sees and torch reports as lists of missing and unknown keys.
        mismatched = [
            f"{key}={tuple(trained[key]) if key == 'data_shape' else trained[key]} in the checkpoint"
            for key in ("data_shape", "latent_dim")
            if key in trained and (tuple(int(s) for s in trained[key]) if key == "data_shape" else trained[key])
            != getattr(self, key)
        ]
        mismatched += [
            f"{name}: {tuple(value.shape)} in the checkpoint, {tuple(own[name].shape)} here"
            for name, value in checkpoint.get("state_dict", {}).items()
            if name in own and tuple(value.shape) != tuple(own[name].shape)
        ]
        if mismatched:
            raise ValueError(
                f"The checkpoint's weights do not fit this {type(self).__name__}, built with "
                f"latent_dim={self.latent_dim} and data_shape={self.data_shape}: "
                f"{'; '.join(mismatched[:3])}. Load it with the data (datamodule) and the hyperparameters "
                "it was trained with (do not override latent_dim, data_shape or widths), or train a new model."
            )
        self._rng_states_to_restore = checkpoint.get("rng_states")
