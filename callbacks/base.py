"""What the evaluation callbacks share: the every-n-epochs rule, the module protocol, samples drawn
per rank in eval mode under a forked random state, and held-out real samples kept for the run.

Callbacks never import the project's models: they work with any LightningModule that has the
methods they name (`sample(num_samples)`; `encode` and `decode` for reconstruction-based ones),
checked at `setup` with a message that says what is missing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor

from maths.layers import eval_mode
from maths.precision import autocast_off
from transport.costs import COST_NAMES

SIGNATURES = {"sample": "sample(num_samples) -> Tensor", "encode": "encode(x) -> Tensor", "decode": "decode(z) -> Tensor"}


def require_methods(pl_module: L.LightningModule, callback: object, methods: Sequence[str]) -> None:
    """Raise TypeError naming what `pl_module` lacks for `callback`."""
    missing = [name for name in methods if not callable(getattr(pl_module, name, None))]
    if missing:
        wanted = ", ".join(SIGNATURES.get(name, name) for name in missing)
        raise TypeError(
            f"{type(callback).__name__} needs the LightningModule to define {wanted}; "
            f"{type(pl_module).__name__} does not. Add the method(s) or remove the callback."
        )


def batch_tensor(batch: Any, callback: object) -> Tensor:
    """The data of a validation batch: the batch itself, or its first element for a tuple or list."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{type(callback).__name__} takes real samples from the validation batches (the batch, or its "
            f"first element for a tuple or list), but got {type(x).__name__}."
        )
    return x


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


@contextmanager
def frozen_eval(module: torch.nn.Module, seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside the block: eval mode, no gradients, no autocast (samples in the module's own dtype), the
    CPU (and a CUDA `device`'s) RNG seeded with `seed`. After it: each submodule's own train/eval
    flag and those RNG states as before."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(module), autocast_off(device):
        torch.random.default_generator.manual_seed(seed)
        for d in devices:  # only the forked device: other GPUs' states are not restored by fork_rng
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


class EvaluationCallback(L.Callback):
    """Base of the callbacks that evaluate a module every few validation epochs.

    Subclasses name the module methods they need (`required`), may keep held-out real samples
    (`held_out_capacity`: per rank, the first ones of the first validation after the sanity check,
    kept on the CPU for the run, so that every evaluation compares like with like), and implement
    `evaluate(trainer, pl_module)`, called at the end of every `every_n_epochs`-th validation epoch
    (never in the sanity check).
    """

    required: tuple[str, ...] = ("sample",)

    def __init__(self, every_n_epochs: int = 1, seed: int = 0) -> None:
        check_positive(every_n_epochs=every_n_epochs)
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self._held_out: list[Tensor] = []
        self._held_out_fixed = False

    # ---- the rule, the protocol -----------------------------------------------------------------

    def due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_methods(pl_module, self, self.required)

    @staticmethod
    def per_rank(total: int, trainer: L.Trainer) -> int:
        """This rank's share of `total` samples (rounded up: every rank contributes as many)."""
        return math.ceil(total / trainer.world_size)

    # ---- held-out real samples ----------------------------------------------------------------

    def held_out_capacity(self, x: Tensor, trainer: L.Trainer) -> int:
        """How many held-out samples this rank keeps, given a first batch x (0: none)."""
        return 0

    @property
    def held_out(self) -> Tensor | None:
        """This rank's held-out samples, (N, ...) on the CPU; None before any validation."""
        return torch.cat(self._held_out) if self._held_out else None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or self._held_out_fixed or dataloader_idx != 0:
            return
        x = batch_tensor(batch, self)
        wanted = self.held_out_capacity(x, trainer) - sum(len(h) for h in self._held_out)
        if wanted > 0:
            self._held_out.append(x[:wanted].detach().to("cpu", copy=True))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._held_out_fixed = True  # the first validation after the sanity check fixes them for the run
        if self.due(trainer):
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    # ---- samples ------------------------------------------------------------------------------

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule, count: int, batch_size: int = 500) -> Tensor:
        """`count` samples of `pl_module.sample(n)` in calls of at most `batch_size`, under
        `frozen_eval` with seed + global_rank (training randomness untouched; the same codes every
        evaluation; other codes on every rank)."""
        chunks = []
        with frozen_eval(pl_module, self.seed + trainer.global_rank, pl_module.device):
            remaining = count
            while remaining > 0:
                n = min(batch_size, remaining)
                chunks.append(pl_module.sample(n).detach())  # only n: user modules may take nothing else
                remaining -= n
        return torch.cat(chunks)
