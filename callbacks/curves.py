"""Curves of logged metrics over training: one PNG plot and one CSV table per run.

`MetricCurvesCallback` records the values of a few logged metrics (for the primal-dual model:
`val/primal`, `val/dual`, `val/gap`, docs/theory.md 3.4) after every validation epoch of a fit, and
writes `<log_dir>/images/<filename>` (the curves over epochs) with a CSV of the same numbers beside
it (`<stem>.csv`: columns epoch, step, then one per key). The image also goes to every logger that
takes images (`callbacks.images.log_image`).

When the values are read. Lightning calls the callbacks' `on_validation_epoch_end` BEFORE the
LightningModule's own `on_validation_epoch_end`, and `trainer.callback_metrics` takes the epoch's
values only once the epoch-end logging has been processed; a module that logs its epoch aggregates
in its own `on_validation_epoch_end` (as `PrimalDual` does) would be seen one epoch late there. So
this callback reads `trainer.callback_metrics` in `on_validation_end`, after both. Consequences:
- validation keys are the values of the validation epoch just finished;
- training epoch aggregates (`train/..._epoch`) are those of the PREVIOUS training epoch (the
  validation of epoch k runs before training epoch k ends);
- the sanity check adds no point; validations outside `fit` (`trainer.validate`) add none either.

Works with any LightningModule: it knows modules only through what they log.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.images import figure_image, log_image, new_figure, output_dir

DEFAULT_KEYS: tuple[str, ...] = ("val/primal", "val/dual", "val/gap")


def _to_float(value: Any) -> float:
    """A logged value (0-dim tensor or number) as a Python float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"MetricCurvesCallback plots scalar metrics, got a tensor of shape {tuple(value.shape)}.")
        return float(value.detach().cpu().item())
    return float(value)


def write_curves_csv(path: str, keys: Sequence[str], rows: Sequence[dict[str, float]]) -> None:
    """One row per recorded validation: epoch, step, then the keys (empty cell = not logged then)."""
    columns = ["epoch", "step", *keys]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            cells = []
            for column in columns:
                value = row.get(column)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    cells.append("")
                elif column in ("epoch", "step"):
                    cells.append(str(int(value)))
                else:
                    cells.append(repr(float(value)))  # shortest exact round trip
            writer.writerow(cells)


def curves_figure(keys: Sequence[str], rows: Sequence[dict[str, float]], title: str, size: float = 5.0) -> Any:
    """A `new_figure` with one line per key against the epoch (against the step when validation runs
    more than once per epoch). Points where a key was not logged are left out of its line."""
    fig = new_figure(size)
    ax = fig.add_subplot()
    epochs = [row["epoch"] for row in rows]
    by_step = len(set(epochs)) < len(epochs)
    x_name = "step" if by_step else "epoch"
    for key in keys:
        points = [(row[x_name], row[key]) for row in rows if key in row and math.isfinite(row[key])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set_xlabel(x_name)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class MetricCurvesCallback(L.Callback):
    """Plot logged metrics over epochs: `<log_dir>/images/<filename>` and a CSV beside it.

    Args:
        keys: logged metric names to record (as in `trainer.callback_metrics`).
        filename: the PNG's file name; the CSV has the same stem. One file each, rewritten as the
            run goes, so the last version holds the whole run.
        every_n_epochs: rewrite the files (and send the image to the loggers) every n-th recorded
            validation; values are recorded at every validation, and the files are written once
            more at the end of the fit so that they always end with the last point.
        title: the plot's title (default: the keys joined by commas).

    Keys absent from `trainer.callback_metrics` at a validation are skipped there (an empty CSV
    cell, no point: callbacks that evaluate every few epochs leave gaps); keys never logged in the
    whole fit get a warning at its end naming them and the keys that are available. Values
    are recorded on every rank (they are the same under DDP with `sync_dist=True`); files are
    written on global rank zero only. Attributes: `rows` (the recorded values), `last_path` (the
    PNG written last, rank zero).
    """

    def __init__(
        self,
        keys: Sequence[str] = DEFAULT_KEYS,
        filename: str = "primal_dual_gap.png",
        every_n_epochs: int = 1,
        title: str | None = None,
    ) -> None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"keys must be a non-empty list of logged metric names, e.g. {list(DEFAULT_KEYS)}, got {keys!r}.")
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must not repeat a name, got {keys}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs}.")
        if not filename.lower().endswith(".png") or os.path.basename(filename) != filename:
            raise ValueError(f"filename must be a plain file name ending in .png (it goes to <log_dir>/images), got {filename!r}.")
        self.keys = keys
        self.filename = filename
        self.every_n_epochs = every_n_epochs
        self.title = title if title is not None else ", ".join(keys)
        self.rows: list[dict[str, float]] = []
        self.last_path: str | None = None
        self._warned = False
        self._available: list[str] = []  # the logged keys at the last validation, for the warning
        self._previous: dict[str, Any] = {}  # the value objects read at the last validation
        self._written = 0  # number of rows in the files written last

    # ---- recording ---------------------------------------------------------------------------

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's own on_validation_epoch_end and the epoch-end logging: see the module docstring.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        row: dict[str, float] = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        for key in self.keys:
            # trainer.callback_metrics keeps a value until it is logged again: a value object seen at the
            # previous validation was not logged this time (a callback that evaluates every few epochs).
            if key in metrics and metrics[key] is not self._previous.get(key):
                row[key] = _to_float(metrics[key])
        self._previous = {key: metrics.get(key) for key in self.keys}
        self._available = sorted(metrics)
        self.rows.append(row)
        if len(self.rows) % self.every_n_epochs == 0:
            self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rows and self._written != len(self.rows):
            self._write(trainer)
        never = [key for key in self.keys if not any(key in row for row in self.rows)]
        if never and self.rows and not self._warned:  # keys logged every few epochs are not missing
            self._warned = True
            rank_zero_warn(
                f"{type(self).__name__}: the key(s) {never} were never among the logged metrics, so they are left "
                f"out of {self.filename!r}. Available: {self._available or 'none'}. Check the names or that "
                "the module (or a callback) logs them."
            )

    # ---- files -------------------------------------------------------------------------------

    def output_paths(self, folder: str) -> tuple[str, str]:
        """(PNG path, CSV path) in `folder`."""
        png = os.path.join(folder, self.filename)
        return png, os.path.splitext(png)[0] + ".csv"

    def _write(self, trainer: L.Trainer) -> None:
        folder = output_dir(trainer, "images")  # on every rank: trainer.log_dir is a collective call
        self._written = len(self.rows)
        if not trainer.is_global_zero:
            return
        png, table = self.output_paths(folder)
        write_curves_csv(table, self.keys, self.rows)
        image = figure_image(curves_figure(self.keys, self.rows, self.title), png)  # (3, H, W)
        self.last_path = png
        log_image(trainer, os.path.splitext(self.filename)[0], image)

    # ---- resuming ----------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # Several of these callbacks in one run (other files) keep separate states in a checkpoint.
        return self._generate_state_key(filename=self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows], "keys": list(self.keys)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit continues the curves of the checkpointed run (if it recorded the same keys)."""
        if list(state_dict.get("keys", [])) == self.keys:
            self.rows = [dict(row) for row in state_dict.get("rows", [])]
