"""Certified bounds on the optimal transport cost between two sample sets, and the callback
that logs them during training (SPEC section 5).

For samples x_1..x_n (real) and y_1..y_m (generated) with uniform weights a, b, and a ground
cost c (`l2sq` = ||x - y||^2 in full, `l2` = ||x - y||, `l1` = ||x - y||_1, on flattened
samples), W_c(a, b) = min over couplings pi of <pi, C>. The functions here return

    lower <= W_c(a, b) <= upper,

both certified whatever the solver's accuracy (see `callbacks/transport.py` for the maths):
`upper` is the cost of a feasible coupling (the Sinkhorn plan rounded onto the exact marginals,
Altschuler, Weed, Rigollet 2017), `lower` is the dual value of c-transformed potentials. The
entropic value OT_eps (debias off) is also >= W_c; the debiased Sinkhorn divergence is not an
upper bound (it can be negative) and is never reported here. E over samples of W_c(a, b) >=
W_c(P_X, P_G) (joint convexity), so a sample bound bounds the population one in expectation;
n and m are reported beside it.

Temperature: eps = 2 blur^2 for `l2sq` and eps = blur for `l2` and `l1`, as in geomloss 0.3's
`geomloss.ot.solve_sample` (whose |x - y|^2 cost uses reg = 2 blur^2; the legacy `SamplesLoss`
uses |x - y|^2 / 2 with eps = blur^2, the same kernel). `blur=None` chooses eps adaptively from
the data's scale: eps-scaling from 1% of the largest cost, lowered until the certified bracket is
within `tol` (so the upper bound is then within tol / (1 - tol) of W_c, certified).

Library use. geomloss 0.3.1 can run the first eps-scaling solve (`warm_start="geomloss"`: its
legacy tensorized `SamplesLoss` with `potentials=True` on the cost matrix held here, see
`callbacks.transport.geomloss_potentials`); its potentials are usable and tested. Its schedule is
fixed and stops short of convergence (L1 marginal errors of 2%-40% measured; the rounded plan
then cost up to 2.7x the exact value at d = 2), so iterations continue from its potentials
until the bracket is tight. It is not the default because on CPU each of its updates cost
2.5-6.5x one of ours here (it allocates full-size temporaries and takes exponentials of
underflowing arguments, a slow path of torch's exp): 10 updates took 2.5 s against 0.4 s for 8
of ours at n = 1000, d = 2, and 33 s at n = 4096, half of a 60-s budget (one thread, shared
machine). Its `online` backend (which would not hold C) needs pykeops, not installed in this
project, and its newer `geomloss.ot.solve_sample` accepts only its "sqeuclidean" cost and a
fixed iteration count. The exact value comes from POT's network simplex `ot.emd2` (optional:
`pip install POT`).

Backends: "tensorized" holds C (n x m float64: 8 n m bytes, 134 MB at n = m = 4096). "chunked"
holds blocks of rows (2 MiB each on CPU, 32 MiB on CUDA) and recomputes C on every pass (a
matrix product with D columns per pass). "auto" picks chunked above 2^25 entries (256 MiB).
Everything runs on the samples' device (CPU or CUDA) in float64.

Layers: pure functions (`wasserstein_bracket`, `sinkhorn_upper_bound`, `exact_wasserstein`);
`WassersteinBound`, a torchmetrics Metric gathering samples across DDP ranks; and
`SinkhornBoundCallback`, logging `val/w_lower`, `val/w_upper` during training.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from callbacks.protocol import require_methods
from callbacks.transport import (
    BACKENDS,
    COST_NAMES,
    CostMatrix,
    check_cost_name,
    cost_block,
    flatten_samples,
    solve,
)

WARM_STARTS: tuple[str, ...] = ("geomloss", "torch")
EXACT_AUTO_ENTRIES = 2**22  # exact="auto": POT's exact solver up to this many cost-matrix entries


def _pot_installed() -> bool:
    return importlib.util.find_spec("ot") is not None


@dataclass(frozen=True)
class WassersteinBracket:
    """A certified bracket lower <= W_c(a, b) <= upper between two sample sets (SPEC 5).

    `eps` is the temperature of the last Sinkhorn stage (0 for the exact solver), `iterations`
    the Sinkhorn updates in all, `n` and `m` the sample sizes, `converged` whether
    relative_width <= tol was reached within the budget (or a width below 1e-12 of the largest
    cost, float64's resolution, when W_c ~ 0). Unpacks as `lower, upper = bracket`.
    """

    lower: float
    upper: float
    eps: float
    iterations: int
    n: int
    m: int
    cost: str
    converged: bool
    seconds: float = 0.0

    @property
    def relative_width(self) -> float:
        """(upper - lower) / upper, 0 when upper is 0."""
        return (self.upper - self.lower) / self.upper if self.upper > 0 else 0.0

    def __iter__(self) -> Iterator[float]:
        yield self.lower
        yield self.upper


def blur_to_eps(blur: float, cost: str) -> float:
    """The temperature eps for a blur radius: 2 blur^2 for l2sq, blur for l2 and l1."""
    if not blur > 0:
        raise ValueError(f"blur must be a positive number (a distance in data units), got {blur}.")
    return 2.0 * blur**2 if cost == "l2sq" else float(blur)


def check_bracket_options(
    cost: str, backend: str, warm_start: str, tol: float, max_seconds: float | None, max_iter: int = 1, marg_tol: float = 1.0
) -> None:
    """Raise ValueError naming the bad option and its valid values."""
    check_cost_name(cost)
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive number of Sinkhorn updates, got {max_iter}.")
    if not marg_tol > 0:
        raise ValueError(f"marg_tol must be a positive L1 marginal error, got {marg_tol}.")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Valid choices: {', '.join(BACKENDS)}.")
    if warm_start not in WARM_STARTS:
        raise ValueError(f"Unknown warm_start {warm_start!r}. Valid choices: {', '.join(WARM_STARTS)}.")
    if not 0 < tol < 1:
        raise ValueError(f"tol is a relative width in (0, 1), got {tol}.")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None (no limit), got {max_seconds}.")


def exact_wasserstein(x: Tensor, y: Tensor, cost: str = "l2sq") -> float:
    """Exact W_c between the empirical measures of x (n, ...) and y (m, ...) by POT's network
    simplex `ot.emd2` (uniform weights; cost as in the module docstring). Under 0.1 s at n = 800,
    a few seconds at n = 4096 on one core; memory n m float64. Needs POT (optional dependency)."""
    check_cost_name(cost)
    try:
        import ot
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "exact_wasserstein needs POT (Python Optimal Transport), an optional dependency: "
            'pip install POT, or pip install -e ".[test]" in this repository.'
        ) from err
    x2, y2 = flatten_samples(x, y)
    n, m = x2.shape[0], y2.shape[0]
    C = cost_block(x2.cpu(), y2.cpu(), cost).numpy()
    value, log = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), C, numItermax=max(100_000, 50 * n * m), log=True)
    if log.get("warning"):
        raise RuntimeError(f"POT's ot.emd2 did not reach the optimum: {log['warning']}")
    return float(value)


def wasserstein_bracket(
    x: Tensor,
    y: Tensor,
    cost: str = "l2sq",
    tol: float = 0.01,
    max_seconds: float | None = 60.0,
    backend: str = "auto",
    blur: float | None = None,
    exact: bool | str = False,
    max_iter: int = 10_000,
    marg_tol: float = 1e-4,
    chunk_size: int | None = None,
    warm_start: str = "torch",
) -> WassersteinBracket:
    """Certified bracket lower <= W_c(x, y) <= upper between two sample sets (SPEC 5).

    Args:
        x: (n, ...) samples, y: (m, ...) samples with the same number of features (flattened).
        cost: "l2sq" (||x - y||^2), "l2" (||x - y||) or "l1" (||x - y||_1).
        tol: stop once (upper - lower) / upper <= tol.
        max_seconds: time budget (None: none); when it runs out the bracket reached so far is
            returned with `converged=False` and its `relative_width`.
        backend: "tensorized" (C in memory, 16 n m bytes), "chunked" (blocks of rows recomputed
            each pass, about 64 MiB), or "auto" (chunked above 2^25 entries).
        blur: None (default) lowers eps until the bracket is within tol; a blur radius fixes
            eps = 2 blur^2 (l2sq) or blur (l2, l1) and iterates there until the L1 marginal
            error is <= marg_tol, then certifies once.
        exact: True uses POT's `ot.emd2` instead (lower = upper = W_c; needs POT); "auto" does so
            when POT is installed and n m <= 2^22 (n = m = 2048: well under a second to a few
            seconds on CPU, where Sinkhorn on tight clusters in low dimension can take minutes),
            and runs the certified Sinkhorn bracket otherwise.
        max_iter: Sinkhorn updates in all.
        marg_tol: with a fixed blur, the L1 marginal error at which iterations stop.
        chunk_size: rows per block of the chunked backend (default about 2^22 entries).
        warm_start: how the first eps-scaling solve runs: "torch" (this module's iterations) or
            "geomloss" (geomloss's solver; tensorized backend only, 2.5-6.5x slower per update
            on CPU here, see the module docstring).

    Returns: a frozen `WassersteinBracket`; `lower, upper = wasserstein_bracket(x, y)` works.
    """
    check_bracket_options(cost, backend, warm_start, tol, max_seconds, max_iter, marg_tol)
    start = time.perf_counter()
    x2, y2 = flatten_samples(x, y)
    n, m = x2.shape[0], y2.shape[0]
    if exact == "auto":
        exact = x2.shape[0] * y2.shape[0] <= EXACT_AUTO_ENTRIES and _pot_installed()
    elif not isinstance(exact, bool):
        raise ValueError(f'exact must be True, False or "auto", got {exact!r}.')
    if exact:
        value = exact_wasserstein(x2, y2, cost)
        return WassersteinBracket(value, value, 0.0, 0, n, m, cost, True, time.perf_counter() - start)
    eps = blur_to_eps(blur, cost) if blur is not None else None
    deadline = start + max_seconds if max_seconds is not None else math.inf
    C = CostMatrix(x2, y2, cost, backend, chunk_size)
    result = solve(C, tol=tol, eps=eps, marg_tol=marg_tol, max_iter=max_iter, deadline=deadline, warm_start=warm_start)
    return WassersteinBracket(
        result.lower, result.upper, result.eps, result.iterations, n, m, cost, result.converged, time.perf_counter() - start
    )


def sinkhorn_upper_bound(
    x: Tensor,
    y: Tensor,
    cost: str = "l2sq",
    blur: float | None = None,
    certified: bool = True,
    tol: float = 0.01,
    max_iter: int = 10_000,
    marg_tol: float = 1e-4,
    max_seconds: float | None = 60.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    warm_start: str = "torch",
) -> float:
    """An upper bound on W_c(x, y) from Sinkhorn (SPEC 5), as a float.

    certified=True: the cost of the rounded coupling, >= W_c whatever the iterations (even one).
    certified=False: the entropic value OT_eps (debias off) of the rounded coupling,
    <pi, C> + eps KL(pi || a x b) >= OT_eps >= W_c, equal to OT_eps once the marginals are tight.

    blur=None (default): eps chosen from the data's scale, lowered until the certified bracket is
    within `tol` (the upper bound is then within tol / (1 - tol) of W_c); the entropic value is
    taken at the last eps. A blur radius fixes eps = 2 blur^2 (l2sq) or blur (l2, l1); iterations
    stop at an L1 marginal error of `marg_tol`, `max_iter` updates or `max_seconds`. Other
    arguments as in `wasserstein_bracket`.
    """
    check_bracket_options(cost, backend, warm_start, tol, max_seconds, max_iter, marg_tol)
    x2, y2 = flatten_samples(x, y)
    eps = blur_to_eps(blur, cost) if blur is not None else None
    deadline = time.perf_counter() + max_seconds if max_seconds is not None else math.inf
    C = CostMatrix(x2, y2, cost, backend, chunk_size)
    result = solve(C, tol=tol, eps=eps, marg_tol=marg_tol, max_iter=max_iter, deadline=deadline, warm_start=warm_start)
    return result.upper if certified else result.entropic


class WassersteinBound(Metric):
    """torchmetrics Metric: the certified bracket on W_c between all real and fake samples seen.

    `update(real, fake)` appends flattened samples (list states, `dist_reduce_fx="cat"`, so DDP
    gathers every rank's samples); `compute()` returns (lower, upper) as float64 scalar tensors
    and keeps the full `WassersteinBracket` in `last_bracket`. Under DDP the bracket computed on
    rank 0 is broadcast, so every rank returns the same values even when the time budget cut
    the ranks' solvers at different iterations. Arguments as in `wasserstein_bracket`; other
    keyword arguments go to torchmetrics' `Metric`.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

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
        self.last_bracket: WassersteinBracket | None = None
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

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
        real, fake = dim_zero_cat(self.real), dim_zero_cat(self.fake)
        bracket = wasserstein_bracket(
            real, fake, self.cost, self.tol, self.max_seconds, self.backend, self.blur, self.exact
        )
        self.last_bracket = bracket = self._broadcast(bracket)
        return (
            torch.tensor(bracket.lower, dtype=torch.float64, device=self.device),
            torch.tensor(bracket.upper, dtype=torch.float64, device=self.device),
        )

    def _broadcast(self, bracket: WassersteinBracket) -> WassersteinBracket:
        dist = torch.distributed
        if not (self.sync_on_compute and dist.is_available() and dist.is_initialized()):
            return bracket
        group = self.process_group
        if dist.get_world_size(group) == 1:
            return bracket
        fields = [bracket.lower, bracket.upper, bracket.eps, bracket.iterations, float(bracket.converged), bracket.seconds]
        values = torch.tensor(fields, dtype=torch.float64, device=self.device)
        dist.broadcast(values, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        lower, upper, eps, iterations, converged, seconds = values.tolist()
        n, m, cost = bracket.n, bracket.m, bracket.cost
        return WassersteinBracket(lower, upper, eps, int(iterations), n, m, cost, converged > 0.5, seconds)


class SinkhornBoundCallback(L.Callback):
    """Log a certified bracket on W_c(real, generated) every few validation epochs (SPEC 5).

    Real samples: the first `num_samples` validation samples (the batch, or its first element when
    the batch is a tuple or list), collected once in the first evaluated epoch and kept for the
    run so that the curve compares like with like; split over DDP ranks. Generated samples: as
    many from `pl_module.sample(n)`, seeded with seed + global_rank under `torch.random.fork_rng`
    (training randomness untouched, other samples on every rank). Samples of all ranks are
    gathered (`WassersteinBound`), so every rank logs the same values:

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
        blur: None (adaptive eps, see `wasserstein_bracket`) or a fixed blur radius.
        tol: target relative width of the bracket.
        seed: generated samples use seed + global_rank at every evaluation.
        batch_size: samples per `pl_module.sample(n)` call.
        max_seconds: time budget of the solver per evaluation (None: none).
        backend: "auto", "tensorized" or "chunked" (see `wasserstein_bracket`).
        exact: "auto" (default): the exact value by POT's `ot.emd2` as both bounds when POT is
            installed and n^2 <= 2^22, the certified Sinkhorn bracket otherwise; True: always
            exact; False: always the bracket.

    Needs `pl_module.sample(num_samples) -> Tensor` (checked at `setup`) and a validation loop
    (the module defines `validation_step`, which may do nothing).
    """

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
        for name, value in [("num_samples", num_samples), ("every_n_epochs", every_n_epochs), ("batch_size", batch_size)]:
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if cost is not None:
            check_cost_name(cost)
        check_bracket_options(cost or "l2sq", backend, "torch", tol, max_seconds)
        if blur is not None:
            blur_to_eps(blur, cost or "l2sq")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.cost = cost
        self.blur = blur
        self.tol = tol
        self.seed = seed
        self.batch_size = batch_size
        self.max_seconds = max_seconds
        self.backend = backend
        self.exact = exact
        self.metric: WassersteinBound | None = None
        self.last_bracket: WassersteinBracket | None = None
        self._real: list[Tensor] = []  # this rank's real samples, kept for the run
        self._real_seen = 0
        self._real_done = False
        self._upper_to_compare: Tensor | None = None  # this epoch's upper bound, compared in on_validation_end

    # ---- setup: the protocol and the cost ---------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_methods(pl_module, self, ["sample"])
        if self.metric is not None:
            return
        cost = self.cost or resolve_cost(pl_module, self)
        self.metric = WassersteinBound(cost, self.tol, self.max_seconds, self.backend, self.blur, self.exact)

    # ---- validation: real samples once, generated samples when due --------------------------

    def _due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _per_rank(self, trainer: L.Trainer) -> int:
        return math.ceil(self.num_samples / trainer.world_size)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        wanted = self._per_rank(trainer) - self._real_seen
        if self._real_done or wanted <= 0 or not self._due(trainer):
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{type(self).__name__} takes real samples from the validation batches (the batch, or its "
                f"first element for a tuple or list), but got {type(x).__name__}."
            )
        x = x[:wanted].detach().to("cpu", copy=True)
        self._real.append(x)
        self._real_seen += len(x)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        if not self._real_done:  # the first evaluated epoch fixes the real samples for the run
            self._real_done = True
            self._real = [torch.cat(self._real)] if self._real else []
        if not self._real:
            raise RuntimeError(
                f"{type(self).__name__} found no validation samples on rank {trainer.global_rank}: it takes "
                "the real samples from the validation batches, so check that validation runs and yields data."
            )
        real = self._real[0]
        fake = self._generate(trainer, pl_module, len(real))
        metric = self.metric.to(pl_module.device)
        metric.reset()
        metric.update(real.to(pl_module.device), fake.to(pl_module.device))
        lower, upper = metric.compute()  # gathers all ranks' samples; rank 0's bracket everywhere
        self.last_bracket = bracket = metric.last_bracket
        # Equal on every rank; sync_dist averages equal values (exact) and is what Lightning expects.
        pl_module.log("val/w_lower", lower.float(), sync_dist=True)
        pl_module.log("val/w_upper", upper.float(), sync_dist=True)
        pl_module.log("val/w_num_samples", float(bracket.n), sync_dist=True)
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

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, count: int) -> Tensor:
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        chunks = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + trainer.global_rank)
            remaining = count
            while remaining > 0:
                n = min(self.batch_size, remaining)
                chunks.append(pl_module.sample(n).detach())  # only n: user modules may take nothing else
                remaining -= n
        return torch.cat(chunks)


def resolve_cost(pl_module: L.LightningModule, callback: object) -> str:
    """The module's `hparams.cost` if it has one (checked), else "l2sq"."""
    hparams = getattr(pl_module, "hparams", None)
    cost = hparams.get("cost") if hparams is not None and hasattr(hparams, "get") else None
    if cost is None:
        return "l2sq"
    if cost not in COST_NAMES:
        raise ValueError(
            f"{type(callback).__name__} uses the module's hparams.cost by default, but {type(pl_module).__name__} "
            f"has cost={cost!r}, which it cannot compute. Pass cost= explicitly; valid choices: {', '.join(COST_NAMES)}."
        )
    return cost
