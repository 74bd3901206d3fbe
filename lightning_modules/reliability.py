"""What keeps a run's work safe: a non-finite loss stops training before any weight changes, with
a message naming the step and the last good checkpoint; a checkpoint is never written with
non-finite weights; a checkpoint whose weights do not fit the model is refused with the model's sizes
in the message."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A training loss (or a weight about to be checkpointed) is NaN or infinite."""


def nonfinite_message(module: L.LightningModule, name: str, loss: Tensor, step: int, critic: bool) -> str:
    """What stops a run on a non-finite loss: the step, the loss, the checkpoint kept, the fixes."""
    values = loss.detach().float().flatten()
    bad = values[~torch.isfinite(values)]
    what = f"is {bad[0].item()}" if bad.numel() else "is not finite on another process"
    trainer = module._trainer
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
        if critic and "skip_nonfinite_critic_steps" in module.hparams
        else ""
    )
    epoch = f" (epoch {trainer.current_epoch})" if trainer is not None else ""
    return (
        f"step {step}: {name} {what}{epoch}. Training stopped before this step changed any "
        f"weight; {kept}. Fixes: lower the learning rates, check the data for NaN or infinite values, "
        f"keep the critic Lipschitz (spectral_norm or gradient_penalty){skip}."
    )


def check_finite_weights(checkpoint: dict[str, Any], step: int) -> None:
    """Refuse to write non-finite weights: the previous checkpoint stays the last good one."""
    bad = [
        name
        for name, value in checkpoint.get("state_dict", {}).items()
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise NonFiniteError(
            f"step {step}: not writing a checkpoint, the weights {', '.join(bad[:3])}"
            f"{' and others' if len(bad) > 3 else ''} are not finite; earlier checkpoints are kept. Lower "
            "the learning rates or check the data for NaN or infinite values, then resume from the last good one."
        )


def check_checkpoint_fits(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse weights whose shapes do not fit `module` (another latent_dim, data shape or width),
    with the model's sizes in the message instead of torch's per-layer error."""
    own = module.state_dict()
    trained = checkpoint.get("hyper_parameters") or {}
    # The trained sizes first: another data shape can change the layers' names (MLP vs. conv),
    # which no shape comparison sees and torch reports as lists of missing and unknown keys.
    mismatched = [
        f"{key}={tuple(trained[key]) if key == 'data_shape' else trained[key]} in the checkpoint"
        for key in ("data_shape", "latent_dim")
        if key in trained and (tuple(int(s) for s in trained[key]) if key == "data_shape" else trained[key])
        != getattr(module, key)
    ]
    mismatched += [
        f"{name}: {tuple(value.shape)} in the checkpoint, {tuple(own[name].shape)} here"
        for name, value in checkpoint.get("state_dict", {}).items()
        if name in own and tuple(value.shape) != tuple(own[name].shape)
    ]
    if mismatched:
        raise ValueError(
            f"The checkpoint's weights do not fit this {type(module).__name__}, built with "
            f"latent_dim={module.latent_dim} and data_shape={module.data_shape}: "
            f"{'; '.join(mismatched[:3])}. Load it with the data (datamodule) and the hyperparameters "
            "it was trained with (do not override latent_dim, data_shape or widths), or train a new model."
        )
