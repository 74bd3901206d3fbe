"""The generalisation gap of the training objective, beside the transport term that bounds it
(docs/theory.md 5.7).

For an objective that is a supremum over c-Lipschitz critics (the dual side, docs/theory.md 4.1), the
value on the n-sample empirical measure P_hat_n differs from the value on P_X by at most
W_c(P_hat_n, P_X). W_c between a training sample and a held-out sample of the same size is the
measurable proxy for that term: by the triangle inequality it is within W_c(P_hat_n, P_X) +
W_c(P_hat'_n, P_X) of zero, and it shrinks with n as the empirical measures converge.

`GeneralizationGapCallback` logs, at the end of every training epoch that ran a validation:

- `val/generalization_gap` = val/<objective> - train/<objective> (the epoch value of the
  training objective: Lightning's `train/<objective>_epoch` when it was logged on_step and
  on_epoch, else `train/<objective>`);
- `val/w_train_val_lower`, `val/w_train_val_upper`: the certified bracket on W_c between
  `num_samples` training and `num_samples` validation samples (`transport.wasserstein_bracket`), computed
  once per run because the data do not change, and `val/w_train_val_num_samples`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from callbacks.base import EvaluationCallback, check_positive, resolve_cost
from transport.bracket import WassersteinBracket, check_bracket_options, wasserstein_bracket
from transport.costs import check_cost_name


def draw_samples(loader: DataLoader, num_samples: int, seed: int) -> Tensor:
    """Up to `num_samples` samples of a dataloader's data (the first element of tuple/list items).

    Map-style datasets: a uniformly random subset of indices drawn from `seed` (no global random
    state is used or changed). Iterable datasets: the first batches of the loader, iterated under
    `torch.random.fork_rng` with `seed`.
    """
    dataset = loader.dataset
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:num_samples].tolist()
        batch = default_collate([dataset[i] for i in indices])
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    chunks, seen = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            chunks.append(x[: num_samples - seen])
            seen += len(chunks[-1])
            if seen >= num_samples:
                break
    if not chunks:
        raise ValueError("the dataloader yielded no data.")
    return torch.cat(chunks)


class GeneralizationGapCallback(EvaluationCallback):
    """Log val/<objective> - train/<objective> and a certified bracket on W_c(train, val).

    Args:
        objective: the logged name without its split: the callback reads `train/<objective>_epoch`
            or `train/<objective>`, and `val/<objective>`, from trainer.callback_metrics.
        num_samples: training and validation samples (each) for the W_c bracket.
        cost: "l2sq", "l2" or "l1"; None: the module's `hparams.cost` if it has one, else "l2sq".
        tol: target relative width of the W_c bracket.
        seed: seeds the choice of the samples (the same on every rank).
        max_seconds: time budget of the W_c solver (None: none).
        backend: "auto", "tensorized" or "chunked" (see `transport.wasserstein_bracket`).

    Needs `trainer.fit(model, datamodule=...)` with a datamodule defining `train_dataloader` and
    `val_dataloader`, and a module that logs the objective for both splits.
    """

    required = ()  # the module is known only through what it logs

    def __init__(
        self,
        objective: str = "primal",
        num_samples: int = 1000,
        cost: str | None = None,
        tol: float = 0.01,
        seed: int = 0,
        max_seconds: float | None = 60.0,
        backend: str = "auto",
    ) -> None:
        if not objective or "/" in objective:
            raise ValueError(f"objective is a logged name without its split prefix (e.g. 'primal'), got {objective!r}.")
        super().__init__(every_n_epochs=1, seed=seed)
        check_positive(num_samples=num_samples)
        if cost is not None:
            check_cost_name(cost)
        check_bracket_options(cost or "l2sq", backend, "geomloss", tol, max_seconds)
        self.objective, self.num_samples = objective, num_samples
        self.cost, self.tol, self.max_seconds, self.backend = cost, tol, max_seconds, backend  # of the W_c bracket
        self.bracket: WassersteinBracket | None = None  # W_c(train sample, val sample), once per run
        self.samples: tuple[Tensor, Tensor] | None = None  # the (train, val) samples it used
        self.last_gap: float | None = None
        self._validated = False  # a (non-sanity) validation ran since the last training epoch end

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not (is_overridden("train_dataloader", dm) and is_overridden("val_dataloader", dm)):
            got = type(dm).__name__ if dm is not None else "no datamodule"
            raise ValueError(
                f"{type(self).__name__} compares a training sample with a held-out one, so it needs "
                "trainer.fit(model, datamodule=...) with a LightningDataModule that defines "
                f"train_dataloader() and val_dataloader() (got {got})."
            )
        if self.cost is None:
            self.cost = resolve_cost(pl_module, self)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = True  # the gap is read at the end of the training epoch, after the module's logging

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._validated:
            return
        self._validated = False
        metrics = trainer.callback_metrics
        train_keys = [f"train/{self.objective}_epoch", f"train/{self.objective}"]
        train_key = next((k for k in train_keys if k in metrics), None)
        val_key = f"val/{self.objective}"
        if train_key is None or val_key not in metrics:
            logged = sorted(k for k in metrics if k.startswith(("train/", "val/")))
            raise ValueError(
                f"{type(self).__name__}(objective={self.objective!r}) needs {' or '.join(train_keys)} and "
                f"{val_key} in trainer.callback_metrics; the module logged {logged or 'none of them'}. "
                "Log the objective for both splits (on_epoch for training) or pass another objective."
            )
        gap = metrics[val_key].double() - metrics[train_key].double()
        self.last_gap = float(gap)
        bracket = self._train_val_bracket(trainer, pl_module)
        pl_module.log("val/generalization_gap", gap.float(), sync_dist=True)
        pl_module.log("val/w_train_val_lower", float(bracket.lower), sync_dist=True)
        pl_module.log("val/w_train_val_upper", float(bracket.upper), sync_dist=True)
        pl_module.log("val/w_train_val_num_samples", float(bracket.n), sync_dist=True)

    def _train_val_bracket(self, trainer: L.Trainer, pl_module: L.LightningModule) -> WassersteinBracket:
        if self.bracket is not None:
            return self.bracket
        dm = trainer.datamodule
        train = draw_samples(dm.train_dataloader(), self.num_samples, self.seed)
        val = draw_samples(dm.val_dataloader(), self.num_samples, self.seed + 1)
        n = min(len(train), len(val))  # samples of the same size
        train, val = train[:n], val[:n]
        self.samples = (train, val)
        with torch.no_grad():
            bracket = wasserstein_bracket(
                train.to(pl_module.device),
                val.to(pl_module.device),
                self.cost,
                self.tol,
                self.max_seconds,
                self.backend,
                exact="auto",  # POT's exact value for small sets when it is installed
            )
        # Every rank solved the same problem; rank 0's answer is kept so a time budget cannot
        # make the ranks log different values.
        self.bracket = trainer.strategy.broadcast(bracket, src=0)
        return self.bracket

    def state_dict(self) -> dict[str, Any]:
        return {"bracket": None if self.bracket is None else vars(self.bracket).copy()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("bracket")
        self.bracket = WassersteinBracket(**saved) if saved else None
