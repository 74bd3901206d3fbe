"""The command line: a LightningCLI subclass, `cli_main` (which tests call) and `main` (the entry
point of `python train.py` and of the installed `primal-dual` command).

What it adds to Lightning's CLI:
- the datamodule's `dims` is passed to the model as `data_shape`, so one model config fits every
  dataset;
- `--ckpt_path last` resumes the newest `last.ckpt` of the config's logger and keeps logging into
  that version folder; `--ckpt_path FILE` is checked before any work (`cli.checkpoints`);
- DDP: the project's models reduce the gradients of each update themselves (one all-reduce of the
  network that update changes, `GenerativeModule.guarded_step`); other modules that optimise
  manually run with `find_unused_parameters=True` (each of their backward passes reaches one
  network only, which DDP's default reducer refuses); an explicit `ddp_find_unused_parameters_false`
  is kept;
- checkpoints are written atomically (`AtomicCheckpointIO`);
- bad input (wrong shapes, unknown names, missing data, a bad checkpoint, a non-finite loss, a
  callback the model cannot serve) is printed as one message with exit status 2;
  PRIMAL_DUAL_TRACEBACK=1 shows the traceback; `cli_main` raises (tests, notebooks);
- every command ends with a summary of the final metrics and of the files written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

import callbacks  # noqa: F401  (registers the callbacks for short names in configs)
import datamodules  # noqa: F401  (registers the datamodules for --data NAME)
import lightning_modules  # noqa: F401  (registers the models for --model NAME)
from cli.checkpoints import AtomicCheckpointIO, check_checkpoint_class, check_checkpoint_file, resolve_last
from datamodules.images import UnreadableImageError
from lightning_modules.base import GenerativeModule
from lightning_modules.reliability import NonFiniteError

TRACEBACK_VARIABLE = "PRIMAL_DUAL_TRACEBACK"
# What `main` reports as one message (exit status 2) instead of a traceback: the errors the
# project raises for bad input, each with a message that names the problem and the fix.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, ModuleNotFoundError, NonFiniteError,
               UnreadableImageError)
NAMED_CKPT_PATHS = ("last", "best", "hpc")  # resolved by Lightning (and "last" by the CLI first)


class PrimalDualCLI(LightningCLI):
    """LightningCLI that links the datamodule's data shape into the model, resolves and checks
    `--ckpt_path`, makes DDP work for manual optimisation, writes checkpoints atomically and
    ends every command with a summary of the final metrics and of the files written."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.dims", "model.init_args.data_shape", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._fill_log_dirs()
        # Before Lightning reads the checkpoint's hyperparameters (which would fail with torch's
        # unpickling traceback on a bad file) and before anything is built.
        self._resolve_ckpt_path()

    def _fill_log_dirs(self) -> None:
        """A logger without a save_dir writes under --trainer.default_root_dir (the configs set none),
        so that checkpoints, images and logs all go where the user chose."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is None:
            return
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is not None and "save_dir" in init_args and init_args.get("save_dir") is None:
                init_args["save_dir"] = trainer.get("default_root_dir") or "."

    def _resolve_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path:
            return
        if ckpt_path == "last":
            resolve_last(subcommand, config)
        elif ckpt_path not in NAMED_CKPT_PATHS and "://" not in str(ckpt_path) and not str(ckpt_path).startswith("registry:"):
            check_checkpoint_file(ckpt_path)
        resolved = config.get("ckpt_path")
        model = config.get("model")
        if resolved and Path(str(resolved)).is_file() and hasattr(model, "get") and model.get("class_path"):
            check_checkpoint_class(resolved, str(model.get("class_path")))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if (
            isinstance(strategy, DDPStrategy)
            and isinstance(ddp_kwargs, dict)
            and "find_unused_parameters" not in ddp_kwargs
            and self.model is not None
            and not self.model.automatic_optimization
            and not isinstance(self.model, GenerativeModule)  # ours average each update's gradients themselves
        ):
            ddp_kwargs["find_unused_parameters"] = True  # read when the model is wrapped, at fit time
            rank_zero_info(
                f"DDP with find_unused_parameters=True: {type(self.model).__name__} optimises manually and each "
                "backward reaches one network only, which DDP's default refuses."
            )
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a user's plugin is kept
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

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


def main(args: Sequence[str] | None = None) -> int:
    """`python train.py ...`: run the CLI and return the exit status. Bad input (USER_ERRORS) is
    printed as one message on stderr with status 2, like a command-line parse error; set
    PRIMAL_DUAL_TRACEBACK=1 to get the traceback instead."""
    try:
        cli_main(args)
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        # jsonargparse reports a class that failed to build as "Does not validate against any of
        # the Union subtypes", with the whole config after it; the model's own message is its cause.
        while err.__cause__ is not None and "Does not validate against any of the Union subtypes" in str(err):
            err = err.__cause__
        print(f"error: {type(err).__name__}: {err}\n(set {TRACEBACK_VARIABLE}=1 for the traceback)", file=sys.stderr, flush=True)
        return 2
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the default process group, if a DDP run made one, before the interpreter exits.
    Lightning leaves a gloo group alive (it only registers this for nccl); its worker threads are
    then torn down by the garbage collector during interpreter shutdown, which intermittently ends
    the process with "terminate called without an active exception" (SIGABRT, exit -6) after a
    run that finished normally."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


