"""The certified Wasserstein bracket during training (docs/theory.md section 5): a torchmetrics
`Metric` that gathers samples over DDP ranks, and a drop-in callback for any module with
`sample(n)`. The maths (`wasserstein_bracket`, `sinkhorn_upper_bound`) lives in `transport` and is
re-exported here for drop-in users."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from callbacks.base import EvaluationCallback, check_positive, resolve_cost
from transport.bracket import Bracket, WassersteinBracket, check_bracket_options, sinkhorn_upper_bound, wasserstein_bracket
from transport.costs import check_cost_name, flatten_samples
from transport.entropic import blur_to_eps

__all__ = ["SinkhornBoundCallback", "WassersteinBound", "sinkhorn_upper_bound", "wasserstein_bracket"]


class SampleBracket(Metric):
    """torchmetrics Metric: a certified bracket between all real and fake samples seen.

    `update(real, fake)` appends flattened float64 samples (list states, `dist_reduce_fx="cat"`, so
    DDP gathers every rank's samples); `compute()` solves the subclass's problem (`solve`) and returns
    (lower, upper) as float64 scalar tensors, keeping the full bracket in `last_bracket`. Under DDP the
    bracket computed on rank 0 is broadcast, so every rank returns the same values even when a time
    budget cut the ranks' solvers at different iterations. Keyword arguments go to `Metric`.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_bracket: Bracket | None = None
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def solve(self, real: Tensor, fake: Tensor) -> Bracket:
        """The bracket between the gathered samples, (n, D) and (m, D) float64."""
        raise NotImplementedError

    def update(self, real: Tensor, fake: Tensor) -> None:
        """real: (B, ...), fake: (B', ...) with the same number of features per sample."""
        real2, fake2 = flatten_samples(real, fake)  # validated float64 (B, D), (B', D)
        for name in ("real", "fake"):
            seen = getattr(self, name)
            if seen and seen[0].shape[1] != real2.shape[1]:
                raise ValueError(
                    f"{type(self).__name__} got samples with {real2.shape[1]} features after samples with "
                    f"{seen[0].shape[1]}; call reset() before changing the data."
                )
        self.real.append(real2)
        self.fake.append(fake2)

    def compute(self) -> tuple[Tensor, Tensor]:
        if not len(self.real) or not len(self.fake):
            raise RuntimeError(f"{type(self).__name__}.compute() needs at least one update(real, fake) first.")
        bracket = self.solve(dim_zero_cat(self.real), dim_zero_cat(self.fake))
        self.last_bracket = bracket = self._broadcast(bracket)
        return (
            torch.tensor(bracket.lower, dtype=torch.float64, device=self.device),
            torch.tensor(bracket.upper, dtype=torch.float64, device=self.device),
        )

    def _broadcast(self, bracket: Bracket) -> Bracket:
        """Rank 0's numbers in every numeric field (the names and sizes are the same everywhere)."""
        dist = torch.distributed
        if not (self.sync_on_compute and dist.is_available() and dist.is_initialized()):
            return bracket
        group = self.process_group
        if dist.get_world_size(group) == 1:
            return bracket
        numeric = [f.name for f in dataclasses.fields(bracket) if not isinstance(getattr(bracket, f.name), str)]
        values = torch.tensor([float(getattr(bracket, name)) for name in numeric], dtype=torch.float64, device=self.device)
        dist.broadcast(values, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        kinds = {name: type(getattr(bracket, name)) for name in numeric}
        return dataclasses.replace(bracket, **{name: kinds[name](v) for name, v in zip(numeric, values.tolist())})


class WassersteinBound(SampleBracket):
    """The certified bracket on W_c between all real and fake samples seen (`SampleBracket`);
    arguments as in `transport.wasserstein_bracket`, other keyword arguments go to `Metric`."""

    higher_is_better = False

    def __init__(
        self,
        cost: str = "l2sq",
        tol: float = 0.01,
        max_seconds: float | None = 60.0,
        backend: str = "auto",
        blur: float | None = None,
        exact: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_bracket_options(cost, backend, "torch", tol, max_seconds)
        if blur is not None:
            blur_to_eps(blur, cost)
        self.cost, self.tol, self.max_seconds, self.backend, self.blur, self.exact = cost, tol, max_seconds, backend, blur, exact

    def solve(self, real: Tensor, fake: Tensor) -> WassersteinBracket:
        return wasserstein_bracket(real, fake, self.cost, self.tol, self.max_seconds, self.backend, self.blur, self.exact)


class BracketCallback(EvaluationCallback):
    """Base of the callbacks that log a certified bracket between held-out data and samples.

    Real samples: the first `num_samples` validation samples (split over DDP ranks), from the first
    validation after the sanity check, kept for the run so that the curve compares like with like.
    Generated samples: as many from `pl_module.sample(n)`, seeded with seed + global_rank. Samples of
    all ranks are gathered by the subclass's `SampleBracket` (`self.metric`, built at `setup`), so
    every rank logs the same `val/<prefix>_lower`, `val/<prefix>_upper` and `val/<prefix>_num_samples`.
    """

    prefix = ""

    def __init__(self, num_samples: int, every_n_epochs: int, seed: int, batch_size: int) -> None:
        super().__init__(every_n_epochs, seed)
        check_positive(num_samples=num_samples, batch_size=batch_size)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.metric: SampleBracket | None = None
        self.last_bracket: Bracket | None = None

    def held_out_capacity(self, x: Tensor, trainer: L.Trainer) -> int:
        return self.per_rank(self.num_samples, trainer)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        real = self.held_out
        if real is None:
            raise RuntimeError(
                f"{type(self).__name__} found no validation samples on rank {trainer.global_rank}: it takes "
                "the real samples from the validation batches, so check that validation runs and yields data."
            )
        fake = self.generate(trainer, pl_module, len(real), self.batch_size)
        metric = self.metric.to(pl_module.device)
        metric.reset()
        metric.update(real.to(pl_module.device), fake.to(pl_module.device))
        lower, upper = metric.compute()  # gathers all ranks' samples; rank 0's bracket everywhere
        self.last_bracket = bracket = metric.last_bracket
        # Equal on every rank; sync_dist averages equal values and is what Lightning expects.
        pl_module.log(f"val/{self.prefix}_lower", lower.float(), sync_dist=True)
        pl_module.log(f"val/{self.prefix}_upper", upper.float(), sync_dist=True)
        pl_module.log(f"val/{self.prefix}_num_samples", float(bracket.n), sync_dist=True)
        self.logged(upper)

    def logged(self, upper: Tensor) -> None:
        """Called with this evaluation's upper end once it is logged."""


class SinkhornBoundCallback(BracketCallback):
    """Log a certified bracket on W_c(real, generated) every few validation epochs (docs/theory.md 5),
    with the held-out and generated samples of `BracketCallback`:

    - `val/w_lower`, `val/w_upper`: lower <= W_c(real, generated) <= upper, certified;
    - `val/w_num_samples`: the number of real samples (= generated samples) used;
    - `val/w_upper_minus_primal`: upper - `val/primal`, when the module logs `val/primal` (read
      in `on_validation_end`, after the module's own epoch-end logging; written to
      trainer.callback_metrics and to the loggers).

    Args:
        num_samples: real and generated samples per evaluation, in all ranks together.
        every_n_epochs: evaluate at the end of every n-th validation epoch (never in the sanity check).
        cost: "l2sq", "l2" or "l1"; None: the module's `hparams.cost` if it has one (the bound is
            then in the units of the module's primal value), else "l2sq".
        blur: None (adaptive eps, see `transport.wasserstein_bracket`) or a fixed blur radius.
        tol: target relative width of the bracket.
        seed: generated samples use seed + global_rank at every evaluation.
        batch_size: samples per `pl_module.sample(n)` call.
        max_seconds: time budget of the solver per evaluation (None: none).
        backend: "auto", "tensorized" or "chunked" (see `transport.wasserstein_bracket`).
        exact: "auto" (default): the exact value by POT's `ot.emd2` as both bounds when POT is
            installed and n^2 <= 2^22, the certified Sinkhorn bracket otherwise; True: always
            exact; False: always the bracket.

    Needs `pl_module.sample(num_samples) -> Tensor` (checked at `setup`) and a validation loop
    (the module defines `validation_step`, which may do nothing).
    """

    prefix = "w"

    def __init__(
        self,
        num_samples: int = 1000,
        every_n_epochs: int = 1,
        cost: str | None = None,
        blur: float | None = None,
        tol: float = 0.01,
        seed: int = 0,
        batch_size: int = 500,
        max_seconds: float | None = 60.0,
        backend: str = "auto",
        exact: bool | str = "auto",
    ) -> None:
        super().__init__(num_samples, every_n_epochs, seed, batch_size)
        if cost is not None:
            check_cost_name(cost)
        check_bracket_options(cost or "l2sq", backend, "torch", tol, max_seconds)
        if blur is not None:
            blur_to_eps(blur, cost or "l2sq")
        self.cost, self.blur, self.tol, self.max_seconds, self.backend, self.exact = cost, blur, tol, max_seconds, backend, exact
        self._upper_to_compare: Tensor | None = None  # this epoch's upper bound, compared in on_validation_end

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.metric is None:
            cost = self.cost or resolve_cost(pl_module, self)
            self.metric = WassersteinBound(cost, self.tol, self.max_seconds, self.backend, self.blur, self.exact)

    def logged(self, upper: Tensor) -> None:
        self._upper_to_compare = upper

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Modules may log val/primal in their own on_validation_epoch_end, which Lightning runs after
        # the callbacks' one: the epoch's value is in callback_metrics only now, where self.log is
        # not allowed, so the difference goes to callback_metrics and the loggers directly.
        upper, self._upper_to_compare = self._upper_to_compare, None
        primal = trainer.callback_metrics.get("val/primal")
        if upper is None or primal is None or trainer.sanity_checking:
            return
        difference = (upper - primal.to(upper)).float().cpu()
        trainer.callback_metrics["val/w_upper_minus_primal"] = difference
        for logger in trainer.loggers:
            logger.log_metrics({"val/w_upper_minus_primal": float(difference)}, step=trainer.global_step)
