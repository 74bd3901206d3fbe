"""What every generative model of the project shares: shapes, the latent prior, `sample`, the
adversary's update loop, and the hooks that keep a run safe (`reliability.py`, `rng.py`).

Subclasses build `self.decoder` (the generator G: Z -> X) in their `__init__`. Callbacks rely
only on `sample(num_samples)` (and `encode` / `decode` where a model has an encoder), so any
LightningModule with those methods works with them.

- Every optimiser update goes through `guarded_step`: a NaN or infinite loss changes no weight (the
  fused Adam skips the step on the device) and stops training at the end of the training step
  (`finish_step`, the step's one host sync: `NonFiniteError`, naming the step and the loss), so the
  last checkpoint on disk is the last good one; critic steps may be skipped instead
  (`skip_nonfinite_critic_steps`). Under DDP the ranks take each decision together, and each update
  averages only the gradients of the network it changes.
- Under DDP every process starts from the same seed, so rank r > 0 reseeds torch at `setup`:
  ranks draw different latent codes (rank 0 keeps a one-process run's stream); evaluation starts
  from rank 0's batch-norm statistics on every rank (the model rank 0 checkpoints).
- Checkpoints carry the random states, restored at the first resumed training epoch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from lightning_modules.networks import check_data_shape, is_image_shape
from lightning_modules.reliability import NonFiniteError, check_checkpoint_fits, check_finite_weights, nonfinite_message
from lightning_modules.rng import collect_rng_states, seed_rank, set_rng_states
from maths.layers import eval_mode
from maths.priors import check_prior_name, sample_prior

Values = dict[str, Tensor]
# One loss scale for several optimisers per step hides skipped steps and leaves the gradient
# penalty's autograd.grad scaled: refused with a message that recommends bf16-mixed.
UNSUPPORTED_PRECISIONS = ("16-mixed", "16")
CHECK_DEVICES = os.environ.get("PRIMAL_DUAL_CHECK_DEVICES", "") not in ("", "0")  # a test-time guard, see `log`


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
        self._step_records: list[dict[str, Any]] = []  # the guarded steps of the current training step
        self._compiled = False

    def setup(self, stage: str) -> None:
        # Denormal floats in early convolution gradients slow CPU training by an order of magnitude;
        # flushing them to zero changes no result at float32 precision. Process-wide; no effect on GPUs.
        torch.set_flush_denormal(True)
        trainer = self._trainer
        if trainer is not None and str(getattr(trainer, "precision", "")) in UNSUPPORTED_PRECISIONS:
            raise ValueError(
                f"--trainer.precision {trainer.precision} is not supported by {type(self).__name__}: its loss scaler "
                "has one scale for the several optimisers of an adversarial step, hides the steps it skips from "
                "the non-finite guard and does not unscale the gradient penalty. Use --trainer.precision "
                "bf16-mixed (the same speed on GPUs with bfloat16, and no scaler needed) or 32-true."
            )
        if trainer is not None and trainer.world_size > 1:
            seed_rank(trainer.global_rank)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """No autocast inside: what is certified or compared across runs (evaluation, transport
        costs, Monte Carlo D_f) is computed in the module's own dtype, whatever the trainer's precision."""
        with torch.autocast(self.device.type, enabled=False):
            yield

    # ---- evaluation: in full precision, with its own seeds -------------------------------------

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with self.evaluation_context(batch_idx):
            self.evaluation_step("val", batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        with self.evaluation_context(batch_idx):
            self.evaluation_step("test", batch, batch_idx)

    @contextmanager
    def evaluation_context(self, batch_idx: int) -> Iterator[None]:
        """No autocast, and the random draws of evaluation (prior codes, samples, encoder noise) from
        a seed of the batch and rank, under `fork_rng`: the same model logs the same values in every
        epoch and in a later `validate` of its checkpoint, whatever the precision it trained in, and
        evaluation leaves training's random stream alone."""
        seed = int(self.hparams.get("val_seed", 0)) + 1 + batch_idx + 100_003 * self.global_rank
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.full_precision():
            torch.random.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)  # the current device: the one forked
            yield

    def evaluation_step(self, split: str, batch: Any, batch_idx: int) -> None:
        """What a validation or test batch logs under `split` ("val" or "test")."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """The speed options of the hyperparameters, applied once the module is on its device:
        `channels_last` puts image networks (and batches) in channels-last memory order, which the
        CPU's and GPU's bfloat16 convolution kernels prefer; `compile` compiles each network with
        `torch.compile` in place (the parameters and checkpoint keys are unchanged)."""
        if self.hparams.get("channels_last") and is_image_shape(self.data_shape):
            self.to(memory_format=torch.channels_last)
        if self.hparams.get("compile") and not self._compiled:
            self._compiled = True
            for network in self.networks():
                network.compile()

    def networks(self) -> list[nn.Module]:
        """The networks of the project's models, what `compile` compiles: encoder, decoder, and the
        critics' networks, but for a critic trained with a gradient penalty (torch.compile does not
        differentiate twice)."""
        critics = [getattr(self, name, None) for name in ("critic", "latent_critic")]
        found = [getattr(self, "encoder", None), self.decoder]
        found += [c.network for c in critics if c is not None and not getattr(c, "gp_weight", 0.0)]
        return [network for network in found if network is not None]

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's `log`; under PRIMAL_DUAL_CHECK_DEVICES=1 (the tests set it) a tensor logged with
        `sync_dist` must live on the module's device, or NCCL could not reduce it."""
        if CHECK_DEVICES and kwargs.get("sync_dist") and isinstance(value, Tensor) and value.device != self.device:
            raise AssertionError(
                f"{name} is logged with sync_dist=True from {value.device}, but the module is on {self.device}: "
                "a collective on another device fails under NCCL. Create it on the module's device."
            )
        super().log(name, value, *args, **kwargs)

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
        if self.hparams.get("channels_last") and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ---- training: guarded optimiser steps, one host sync per training step ---------------------

    def adam(self, params: Any, lr: float, betas: Sequence[float]) -> torch.optim.Adam:
        """Adam with the fused implementation: it can skip a step on the device (`guarded_step`)."""
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)

    def adversary_steps(
        self, optimizer: Any, step_loss: Callable[[], tuple[Tensor, Values]], steps: int, name: str
    ) -> None:
        """`steps` guarded updates of an adversary (a critic) with `optimizer`, each descending the loss
        of `step_loss()` -> (loss, values to log), skippable when `skip_nonfinite_critic_steps` is set.
        Only the adversary's parameters take gradients meanwhile."""
        self.toggle_optimizer(optimizer)
        for _ in range(steps):
            loss, values = step_loss()
            self.guarded_step(optimizer, {name: loss}, values, critic=True)
        self.untoggle_optimizer(optimizer)

    def guarded_step(
        self, optimizer: Any, losses: dict[str, Tensor], values: Values | None = None, critic: bool = False,
        backward: Callable[[], None] | None = None,
    ) -> None:
        """One optimiser update that no NaN or infinite loss can reach, without a host sync.

        Zeroes the gradients, runs `backward()` (default: the backward of the single loss), averages
        the gradients of `optimizer`'s parameters over DDP ranks, and steps. The fused Adam skips the
        step on the device when a loss of `losses` is not finite on any rank, or when an earlier loss
        of this training step was fatally so; the decision is read once, in `finish_step`. A critic
        step (`critic=True`) of a module with `skip_nonfinite_critic_steps` is only skipped; any other
        non-finite loss stops training there, before any later step of the batch changes a weight.
        `values` are logged by `finish_step` if the step was taken.
        """
        names, step = list(losses), self.global_step
        bad = torch.stack([~torch.isfinite(loss.detach()).all() for loss in losses.values()]).to(torch.float32)  # (k,)
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # the ranks decide together
        skippable = critic and bool(self.hparams.get("skip_nonfinite_critic_steps", False))
        # float32 whatever the default dtype: the fused Adam's found_inf is a float tensor
        fatal = self._step_records[-1]["fatal"] if self._step_records else torch.zeros((), dtype=bad.dtype, device=bad.device)
        skip = torch.maximum(bad.max(), fatal)  # 0-dim
        optimizer.zero_grad()
        if backward is None:
            (loss,) = losses.values()
            self.manual_backward(loss)
        else:
            backward()
        self._average_gradients(optimizer)
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the torch optimiser
        if inner.defaults.get("fused"):
            inner.found_inf = skip
            optimizer.step()
            del inner.found_inf
        elif not bool(skip):  # an optimiser that cannot skip on the device: decide on the host now
            optimizer.step()
        self._step_records.append({
            "names": names, "bad": bad, "skippable": skippable, "critic": critic, "step": step,
            "values": values or {},
            "losses": [loss.detach() for loss in losses.values()],
            "fatal": fatal if skippable else torch.maximum(fatal, bad.max()),
        })

    def finish_step(self) -> Values:
        """The training step's one host sync: raise `NonFiniteError` for the first fatal non-finite loss
        (no weight has changed since), count the skipped critic steps (`train/skipped_critic_steps`),
        and return the values of the steps taken (for each key, the last one)."""
        records, self._step_records = self._step_records, []
        if not records:
            return {}
        flags = torch.stack([r["bad"].max() for r in records]).cpu()  # the one sync
        values: Values = {}
        for record, bad in zip(records, flags.tolist()):
            if bad and not record["skippable"]:
                name, loss = next((n, l) for n, l, b in zip(record["names"], record["losses"], record["bad"]) if b)
                raise NonFiniteError(nonfinite_message(self, name, loss, record["step"], record["critic"]))
            if not bad:
                values.update(record["values"])
        if self.hparams.get("skip_nonfinite_critic_steps", False):
            skipped = float(sum(flags.tolist()))
            self.log("train/skipped_critic_steps", skipped, on_step=False, on_epoch=True, reduce_fx="sum")
        return values

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, with DDP's own gradient reduction off: `guarded_step` averages the
        gradients of the optimiser it steps, so each update reduces only the network it changes."""
        ddp = self._ddp_model()
        if ddp is None:
            return super().manual_backward(loss, *args, **kwargs)
        with ddp.no_sync():
            return super().manual_backward(loss, *args, **kwargs)

    def _ddp_model(self) -> torch.nn.parallel.DistributedDataParallel | None:
        model = getattr(self._trainer.strategy, "model", None) if self._trainer is not None else None
        return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None

    def _average_gradients(self, optimizer: Any) -> None:
        """Average the gradients of `optimizer`'s parameters over the DDP ranks, in one all-reduce."""
        if self._ddp_model() is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)  # SUM works on every backend; AVG only on NCCL
        flat.div_(torch.distributed.get_world_size())
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

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
