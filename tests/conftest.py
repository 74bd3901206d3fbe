"""Fixtures shared by the test files (importable helpers are in `helpers.py`, subprocess helpers
in `probes.py`).

- `quiet_trainer`: a factory of one-process CPU Trainers with no logger, checkpoints, progress bar
  or model summary; keywords override the defaults (a test file may override the fixture itself,
  as tests/test_fid.py does with `limit_train_batches`).
- `one_thread`: torch on one thread for the test (modules ask for it with
  `pytestmark = pytest.mark.usefixtures("one_thread")`): the networks and transport problems of
  the tests are tiny, and on a shared 2-core machine two threads waiting on each other ran them
  3-10x (float64 convolutions up to 1000x) slower than one.
- `in_tmp_dir`: the working directory is the test's tmp_path (the configs write runs/ below it),
  and PRIMAL_DUAL_TRACEBACK is unset (so that `main` prints one message).
- `checkpoint_round_trip`: a model of the project trained for two batches of digits, saved and
  loaded back; the loaded generator must equal the trained one.

PRIMAL_DUAL_CHECK_DEVICES=1 is set for the whole session (see `GenerativeModule.log`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

# Every test (and every process it starts) checks that values logged with sync_dist live on the
# module's device (`GenerativeModule.log`); set before the project's modules are imported.
os.environ["PRIMAL_DUAL_CHECK_DEVICES"] = "1"

import lightning as L
import pytest
import torch

from cli.command import TRACEBACK_VARIABLE
from datamodules import DigitsDataModule
from helpers import one_torch_thread

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def make_quiet_trainer(*, limit_train_batches: int | float | None = None, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer on one device without logger, checkpoints, progress bar or model summary;
    `limit_train_batches` None keeps Lightning's default (every batch); other keywords override."""
    if limit_train_batches is not None:
        kwargs["limit_train_batches"] = limit_train_batches
    return L.Trainer(accelerator="cpu", devices=1, **{**QUIET, **kwargs})


@pytest.fixture
def quiet_trainer() -> Callable[..., L.Trainer]:
    """`quiet_trainer(**overrides) -> L.Trainer` (see `make_quiet_trainer`)."""
    return make_quiet_trainer


@pytest.fixture
def one_thread():
    """torch on one thread during the test, the previous number of threads restored after."""
    with one_torch_thread():
        yield


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run the test in its tmp_path, without PRIMAL_DUAL_TRACEBACK."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)
    return tmp_path


@pytest.fixture
def checkpoint_round_trip(quiet_trainer, tmp_path) -> Callable[..., L.LightningModule]:
    """`checkpoint_round_trip(model, **load_kwargs) -> loaded`: fit `model` (data_shape (1, 8, 8))
    on two batches of digits and one validation batch, save a checkpoint, load it with
    `type(model).load_from_checkpoint(path, **load_kwargs)` and check that the loaded generator
    decodes codes as the trained one does (both in eval mode on return)."""

    def run(model: L.LightningModule, **load_kwargs: Any) -> L.LightningModule:
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
        path = tmp_path / f"{type(model).__name__}.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(model).load_from_checkpoint(path, **load_kwargs)
        z = torch.randn(4, loaded.latent_dim)
        torch.testing.assert_close(loaded.eval().decode(z), model.eval().decode(z))
        return loaded

    return run
