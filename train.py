"""Train, validate and test the project's models from the command line.

    python train.py fit --config configs/wae_digits.yaml
    python train.py fit --config configs/wae_digits.yaml --model.init_args.latent_penalty gan
    python train.py fit --help

Models and datamodules are chosen by class (`--model WAE`, `--data DigitsDataModule`, or any
importable LightningModule / LightningDataModule by its full class path); the datamodule's
`dims` is passed to the model as `data_shape`, so one model config fits every dataset.
"""

from __future__ import annotations

import os
from typing import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

import callbacks  # noqa: F401  (registers the callbacks for short names in configs)
import datamodules  # noqa: F401  (registers the datamodules for --data NAME)
import lightning_modules  # noqa: F401  (registers the models for --model NAME)


class PrimalDualCLI(LightningCLI):
    """LightningCLI that links the datamodule's data shape into the model and ends every
    command with a summary of the final metrics and of the files written."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.dims", "model.init_args.data_shape", apply_on="instantiate")

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")

    def _print_summary(self, command: str) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank makes it
        if not trainer.is_global_zero:
            return
        lines = [f"\n{command} finished: epoch {trainer.current_epoch}, {trainer.global_step} optimiser steps."]
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
        # Keep one value per metric: the epoch aggregate where Lightning logged step and epoch values.
        shown = {k: v for k, v in metrics.items() if not k.endswith("_step") and f"{k}_epoch" not in metrics}
        width = max((len(k) for k in shown), default=0)
        lines += [f"  {k:<{width}}  {v:.5g}" for k, v in shown.items()]
        checkpoint = trainer.checkpoint_callback
        if command == "fit" and checkpoint is not None:
            saved = getattr(checkpoint, "last_model_path", "") or checkpoint.best_model_path
            if saved:
                lines.append(f"Checkpoint: {os.path.relpath(saved)}")
        images = os.path.join(log_dir, "images")
        if os.path.isdir(images) and os.listdir(images):
            newest = max(os.listdir(images), key=lambda name: os.path.getmtime(os.path.join(images, name)))
            lines.append(f"Images:     {os.path.relpath(images)} (latest: {newest})")
        lines.append(f"Logs:       {os.path.relpath(log_dir)}")
        print("\n".join(lines), flush=True)


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> PrimalDualCLI:
    """Build (and by default run) the CLI; `args` replaces sys.argv[1:] (used by the tests)."""
    return PrimalDualCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the models build their own (several) optimisers
    )


if __name__ == "__main__":
    cli_main()
