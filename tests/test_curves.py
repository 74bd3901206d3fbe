"""MetricCurvesCallback: the CSV holds exactly the values a module logged in its own
on_validation_epoch_end (read after the epoch-end logging, not one epoch late), the sanity check
and trainer.validate add no point, missing keys warn once, the schedule, loggers, resuming, the
PrimalDual flagship config, and bad arguments."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from callbacks.curves import MetricCurvesCallback
from cli.command import cli_main
from helpers import ImageLogger, TrivialModule

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def epoch_value(epoch: int) -> float:
    """What EpochLogger logs as val/primal at epoch k: not a float32-round number, so that a float32
    cast anywhere in between would show."""
    return 1.0 / 3.0 + 0.7 * epoch


class EpochLogger(TrivialModule):
    """Logs known values in its OWN on_validation_epoch_end (val/primal, val/dual, val/gap =
    primal - dual), and a batch mean in validation_step (val/batch_mean); remembers what it logged."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/batch_mean", batch[0].sum(dim=1).mean())

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            primal, dual = -100.0, -200.0  # would show if the sanity check added a point
        else:
            primal, dual = epoch_value(self.current_epoch), 0.25 * epoch_value(self.current_epoch)
            self.logged[self.current_epoch] = {"val/primal": primal, "val/dual": dual}
        values = {"val/primal": primal, "val/dual": dual, "val/gap": primal - dual}
        self.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})


def loaders(n: int = 8):
    x = torch.arange(2 * n, dtype=torch.float32).reshape(n, 2) / n
    loader = DataLoader(TensorDataset(x), batch_size=4)
    return loader, loader


@pytest.fixture
def trainer(quiet_trainer, tmp_path):
    """`trainer(callbacks, max_epochs=3, **overrides)`: a quiet Trainer writing below tmp_path."""

    def make(callbacks, max_epochs: int = 3, **kwargs) -> L.Trainer:
        return quiet_trainer(max_epochs=max_epochs, default_root_dir=str(tmp_path), callbacks=callbacks, **kwargs)

    return make


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_holds_exactly_the_values_logged_each_epoch_and_the_png_exists(tmp_path, trainer):
    curves = MetricCurvesCallback(keys=["val/primal", "val/dual", "val/gap", "val/batch_mean"], title="known values")
    model = EpochLogger()
    trainer([curves], num_sanity_val_steps=2).fit(model, *loaders())

    png, table = tmp_path / "images" / "primal_dual_gap.png", tmp_path / "images" / "primal_dual_gap.csv"
    rows = read_csv(table)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # one point per epoch, none from the sanity check
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # 2 training batches per epoch
    for r in rows:
        logged = model.logged[int(r["epoch"])]
        assert float(r["val/primal"]) == logged["val/primal"]  # exact: read after this epoch's logging
        assert float(r["val/dual"]) == logged["val/dual"]
        assert float(r["val/gap"]) == logged["val/primal"] - logged["val/dual"]
        assert float(r["val/batch_mean"]) == pytest.approx(loaders()[1].dataset.tensors[0].sum(1).mean().item(), rel=1e-6)
    last = curves.rows[-1]
    assert last["val/primal"] == trainer_metric(model, "val/primal") == epoch_value(2)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert curves.last_path == str(png)


def trainer_metric(model: L.LightningModule, key: str) -> float:
    return model.trainer.callback_metrics[key].item()


class ReadsAtCallbackEpochEnd(L.Callback):
    """What a callback would see in its own on_validation_epoch_end: the previous epoch's value."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            value = trainer.callback_metrics.get("val/primal")
            self.seen.append(None if value is None else value.item())


def test_reading_at_epoch_end_would_be_one_epoch_late(trainer):
    """Why the callback reads in on_validation_end: at the callbacks' on_validation_epoch_end the
    module has not logged yet (Lightning runs the callbacks' hook first)."""
    early, curves = ReadsAtCallbackEpochEnd(), MetricCurvesCallback()
    trainer([early, curves], num_sanity_val_steps=0).fit(EpochLogger(), *loaders())
    assert early.seen == [None, epoch_value(0), epoch_value(1)]
    assert [r["val/primal"] for r in curves.rows] == [epoch_value(0), epoch_value(1), epoch_value(2)]


def test_missing_keys_are_skipped_with_one_warning_naming_them_and_the_available_keys(tmp_path, trainer):
    curves = MetricCurvesCallback(keys=["val/primal", "val/not_logged"], filename="c.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([curves]).fit(EpochLogger(), *loaders())
    ours = [str(w.message) for w in caught if "MetricCurvesCallback" in str(w.message)]
    assert len(ours) == 1  # three epochs, one warning
    assert "val/not_logged" in ours[0] and "val/primal" in ours[0] and "val/dual" in ours[0]  # available keys named
    rows = read_csv(tmp_path / "images" / "c.csv")
    assert [r["val/not_logged"] for r in rows] == ["", "", ""]
    assert [float(r["val/primal"]) for r in rows] == [epoch_value(k) for k in range(3)]
    assert (tmp_path / "images" / "c.png").exists()


def test_only_fit_validations_count(trainer):
    curves = MetricCurvesCallback()
    model = EpochLogger()
    t = trainer([curves], max_epochs=2)
    t.fit(model, *loaders())
    t.validate(model, loaders()[1], verbose=False)
    assert len(curves.rows) == 2


def test_every_n_epochs_schedule_the_final_write_and_the_logger(tmp_path, trainer):
    logger = ImageLogger(tmp_path / "run")
    curves = MetricCurvesCallback(every_n_epochs=2, filename="gap.png")
    trainer([curves], max_epochs=3, logger=logger).fit(EpochLogger(), *loaders())
    # written after the 2nd validation, then at the end of the fit with all three points
    assert [(key, step) for key, _, step in logger.images] == [("gap", 4), ("gap", 6)]
    assert all(image.shape[0] == 3 for _, image, _ in logger.images)
    rows = read_csv(tmp_path / "run" / "images" / "gap.csv")  # under the logger's log_dir
    assert len(rows) == 3


def test_a_resumed_fit_continues_the_curves(tmp_path, trainer):
    first = MetricCurvesCallback()
    t = trainer([first], max_epochs=2)
    model = EpochLogger()
    t.fit(model, *loaders())
    t.save_checkpoint(tmp_path / "last.ckpt")
    second = MetricCurvesCallback()
    trainer([second], max_epochs=3).fit(EpochLogger(), *loaders(), ckpt_path=tmp_path / "last.ckpt")
    assert [r["epoch"] for r in second.rows] == [0, 1, 2]
    assert [float(r["val/primal"]) for r in read_csv(tmp_path / "images" / "primal_dual_gap.csv")] == [
        epoch_value(k) for k in range(3)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        MetricCurvesCallback(keys=[])
    with pytest.raises(ValueError, match="repeat"):
        MetricCurvesCallback(keys=["val/a", "val/a"])
    with pytest.raises(ValueError, match="every_n_epochs"):
        MetricCurvesCallback(every_n_epochs=0)
    with pytest.raises(ValueError, match=".png"):
        MetricCurvesCallback(filename="curves.jpg")
    with pytest.raises(ValueError, match="plain file name"):
        MetricCurvesCallback(filename="sub/curves.png")


@pytest.mark.usefixtures("in_tmp_dir")  # the config writes runs/ below the working directory
def test_flagship_config_writes_the_primal_dual_plot():
    """configs/primal_dual_digits.yaml as shipped, on the real PrimalDual: the curve's points are
    the logged epoch values of the keys the config plots (the model's own at every epoch)."""
    path = ROOT / "configs" / "primal_dual_digits.yaml"
    config = yaml.safe_load(path.read_text())
    assert any(c["class_path"].endswith("MetricCurvesCallback") for c in config["trainer"]["callbacks"])
    cli = cli_main(["fit", "--config", str(path), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
                    "--trainer.limit_val_batches", "2", "--trainer.enable_model_summary", "false",
                    "--trainer.enable_progress_bar", "false", "--model.init_args.width", "8",
                    "--model.init_args.critic_width", "8", "--model.init_args.mc_samples", "128"])
    curves = next(c for c in cli.trainer.callbacks if isinstance(c, MetricCurvesCallback))
    folder = Path(cli.trainer.log_dir) / "images"
    rows = read_csv(folder / "primal_dual_gap.csv")
    assert len(rows) == 2 and (folder / "primal_dual_gap.png").exists()
    last = cli.trainer.callback_metrics
    logged = [key for key in curves.keys if key in last]
    assert {"val/primal", "val/dual", "val/dual_lower_bound"} <= set(logged)  # PrimalDual logs them every epoch
    for key in logged:
        assert float(rows[-1][key]) == pytest.approx(last[key].item(), rel=1e-6), key


class FakeRankOneTrainer:
    """What the callback reads of a trainer, as global rank 1 of a DDP run; counts log_dir reads."""

    def __init__(self, root: Path) -> None:
        from types import SimpleNamespace

        self.root, self.log_dir_reads = root, 0
        self.sanity_checking, self.state = False, SimpleNamespace(fn="fit")
        self.current_epoch, self.global_step, self.is_global_zero = 0, 5, False
        self.callback_metrics = {"val/primal": torch.tensor(1.5)}
        self.default_root_dir, self.loggers = str(root), []

    @property
    def log_dir(self) -> str:
        self.log_dir_reads += 1  # a collective call under DDP: every rank must make it
        return str(self.root)


def test_other_ranks_record_and_make_the_collective_call_but_write_nothing(tmp_path):
    curves = MetricCurvesCallback(keys=["val/primal"])
    fake = FakeRankOneTrainer(tmp_path)
    curves.on_validation_end(fake, None)
    curves.on_fit_end(fake, None)
    assert curves.rows == [{"epoch": 0.0, "step": 5.0, "val/primal": 1.5}]
    assert fake.log_dir_reads == 1  # as many as rank zero makes (one write), no more
    assert not any((tmp_path / "images").iterdir()) and curves.last_path is None
