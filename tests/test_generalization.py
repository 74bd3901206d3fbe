"""GeneralizationGapCallback (SPEC 4 and 5): the gap read back from what the module logged,
the train/val W_c bracket against POT's exact value on the very samples used, computed once per
run, and clear errors for a missing datamodule or objective."""

from __future__ import annotations

import lightning as L
import numpy as np
import ot
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import callbacks.generalization as generalization
from callbacks.generalization import GeneralizationGapCallback, draw_samples

pytestmark = pytest.mark.usefixtures("one_thread")


class Data(L.LightningDataModule):
    """Gaussian (x, y) pairs of shape (1, 2, 3): 48 for training, 40 held out."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train = TensorDataset(torch.randn(48, 1, 2, 3, generator=g), torch.zeros(48))
        self.val = TensorDataset(0.5 + torch.randn(40, 1, 2, 3, generator=g), torch.zeros(40))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=16)


class Objective(L.LightningModule):
    """Logs a made-up objective for both splits and records the epoch values it logged."""

    def __init__(self, on_step: bool = True, cost: str | None = None) -> None:
        super().__init__()
        if cost is not None:
            self.save_hyperparameters("cost")
        self.layer = nn.Linear(6, 1)
        self.on_step = on_step
        self.train_values: list[list[float]] = [[]]
        self.val_values: list[list[float]] = [[]]

    def training_step(self, batch, batch_idx):
        value = self.layer(batch[0].flatten(1)).square().mean()
        self.train_values[-1].append(value.item())
        self.log("train/primal", value, on_step=self.on_step, on_epoch=True)
        return value

    def on_train_epoch_end(self):
        self.train_values.append([])

    def validation_step(self, batch, batch_idx):
        value = self.layer(batch[0].flatten(1)).square().mean()
        if not self.trainer.sanity_checking:
            self.val_values[-1].append((value.item(), len(batch[0])))
        self.log("val/primal", value)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_values.append([])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(callbacks, epochs=2, **kwargs):
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=epochs, num_sanity_val_steps=1, callbacks=callbacks, **kwargs,
    )


def exact_l2sq(x: torch.Tensor, y: torch.Tensor) -> float:
    xs, ys = x.flatten(1).double().numpy(), y.flatten(1).double().numpy()
    return float(ot.emd2(np.full(len(xs), 1 / len(xs)), np.full(len(ys), 1 / len(ys)), ot.dist(xs, ys)))


@pytest.mark.parametrize("on_step", [True, False])
def test_gap_and_train_val_bracket(on_step, monkeypatch):
    calls = []
    original = generalization.wasserstein_bracket
    monkeypatch.setattr(generalization, "wasserstein_bracket", lambda *a, **k: calls.append(1) or original(*a, **k))
    callback = GeneralizationGapCallback(num_samples=30, seed=3, max_seconds=None)
    model = Objective(on_step=on_step)
    fit = trainer([callback], epochs=2, limit_train_batches=3)
    fit.fit(model, datamodule=Data())
    metrics = fit.callback_metrics
    # the last epoch's values, as Lightning averages them: train by step (batches of 16), val by batch size
    train_epoch = np.mean(model.train_values[1])
    val_values = model.val_values[1]
    val_epoch = sum(v * n for v, n in val_values) / sum(n for _, n in val_values)
    assert metrics["val/generalization_gap"].item() == pytest.approx(val_epoch - train_epoch, rel=1e-4, abs=1e-6)
    # the W_c bracket: computed once, on 30 training and 30 validation samples, around the exact value
    assert len(calls) == 1
    train, val = callback.samples
    assert train.shape == val.shape == (30, 1, 2, 3)
    assert all(any(torch.equal(t, s) for s in Data().train.tensors[0]) for t in train)
    assert all(any(torch.equal(v, s) for s in Data().val.tensors[0]) for v in val)
    exact = exact_l2sq(train, val)
    lower, upper = metrics["val/w_train_val_lower"].item(), metrics["val/w_train_val_upper"].item()
    assert lower <= exact * (1 + 1e-6) and exact <= upper * (1 + 1e-6) and upper - lower <= 0.011 * upper
    assert metrics["val/w_train_val_num_samples"].item() == 30


def test_gap_only_after_epochs_that_validated():
    callback = GeneralizationGapCallback(num_samples=20, cost="l2", max_seconds=None)
    model = Objective()
    fit = trainer([callback], epochs=3, limit_train_batches=2, check_val_every_n_epoch=2)
    fit.fit(model, datamodule=Data())
    assert callback.bracket is not None and callback.bracket.cost == "l2"
    # only epoch 2 validated: the gap compares epoch 2's training value with that validation
    train_epoch_2 = np.mean(model.train_values[1])
    val_epoch_2 = sum(v * n for v, n in model.val_values[0]) / sum(n for _, n in model.val_values[0])
    assert callback.last_gap == pytest.approx(val_epoch_2 - train_epoch_2, rel=1e-4, abs=1e-6)


def test_draw_samples_is_seeded_and_leaves_global_rng_alone():
    loader = Data().train_dataloader()
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b = draw_samples(loader, 10, seed=1), draw_samples(loader, 10, seed=1)
    assert torch.equal(a, b) and a.shape == (10, 1, 2, 3)
    assert not torch.equal(a, draw_samples(loader, 10, seed=2))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert draw_samples(loader, 1000, seed=1).shape[0] == 48  # at most the dataset


def test_errors_name_what_is_missing():
    data = Data()
    with pytest.raises(ValueError, match="datamodule"):
        trainer([GeneralizationGapCallback(num_samples=10)], epochs=1).fit(
            Objective(), data.train_dataloader(), data.val_dataloader()
        )
    with pytest.raises(ValueError, match=r"train/recon_epoch or train/recon.*val/recon"):
        trainer([GeneralizationGapCallback(objective="recon", num_samples=10)], epochs=1, limit_train_batches=1).fit(
            Objective(), datamodule=Data()
        )
    with pytest.raises(ValueError, match="split prefix"):
        GeneralizationGapCallback(objective="val/primal")
    with pytest.raises(ValueError, match=r"Valid choices: l2, l2sq, l1"):
        GeneralizationGapCallback(cost="cosine")
