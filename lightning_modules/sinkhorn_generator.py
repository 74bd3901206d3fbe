"""A generator trained by regularised optimal transport: the upper side of the chain (SPEC 4, 5).

The paper's chain GAN_{lambda f}(P_X, G; H_c) <= fWAE_{c,lambda}(P_X, G) <= W_c(P_X, P_G) ends with
W_c, and the cost of any feasible coupling lies above W_c. Minimising such a cost from above is the
third training objective beside the dual (the f-GAN critic, `fgan.py`) and the primal (the
f-WAE encoder, `wae.py`): a generator G is trained without critic or encoder, by descending an
optimal transport loss between a data batch x_1..x_N and a batch of samples y_j = G(z_j)
(Genevay, Peyre, Cuturi 2018; Feydy et al. 2019), with uniform weights a, b and C_ij = c(x_i, y_j):

- objective="entropic": OT_eps(a, b) = min_{pi in Pi(a, b)} <pi, C> + eps KL(pi || a x b).
  Every coupling's cost is >= W_c and the KL term is >= 0, so OT_eps(a, b) >= W_c(a, b): an UPPER
  BOUND on W_c, hence on the f-WAE; minimising it minimises an upper bound. Over random batches,
  E OT_eps(a, b) >= E W_c(a, b) >= W_c(P_X, P_G) (joint convexity, SPEC 5), so the expected batch
  value bounds the population W_c and fWAE_{c,lambda}(P_X, G) from above. It is biased (its
  minimiser over b is not a itself but a blurred, shrunk copy, with a bias that vanishes as
  eps -> 0). Logged as `train/ot_entropic`, `val/ot_entropic`.
- objective="sinkhorn_divergence": S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2
  (debiased): zero at b = a, better gradients, no shrinking bias, but NOT a bound on W_c: it can
  be far below it (for l2sq it tends to |mean(a) - mean(b)|^2 as eps grows, zero for two clouds
  with the same mean and different spreads). Logged as `train/sinkhorn_divergence`,
  `val/sinkhorn_divergence`, never as a bound.

Both are computed by geomloss's legacy `SamplesLoss("sinkhorn", backend="tensorized")` on the
flattened samples (its eps-scaling solve, `scaling` the ratio between successive blur radii).
geomloss's conventions are hidden behind the project's cost names: with p = 2 it uses the cost
|x - y|^2 / 2 at temperature blur^2, and OT_eps(C) = 2 OT_{eps/2}(C / 2), so "l2sq" (|x - y|^2 in
full) is twice its p = 2 value at the same blur, and has eps = 2 blur^2; with p = 1 its cost is
|x - y| at eps = blur, which is "l2" as is. These temperatures, eps = 2 blur^2 (l2sq) and blur
(l2), are those of `callbacks/sinkhorn.py`. geomloss returns the dual value <a, f> + <b, g> of its
last potentials: OT_eps once its schedule has converged (scaling -> 1), slightly below OT_eps
before that (relative errors 2e-3 at scaling 0.5, 5e-7 at 0.999 on a 12-point problem), and its
gradient is the envelope-theorem gradient of that solve (it matches finite differences of the
value as scaling -> 1). The logged training value is therefore an estimate of OT_eps; the
certified statement is the validation bracket below.

Validation logs a certified bracket (`callbacks.sinkhorn.wasserstein_bracket`, SPEC 5) between up
to `val_num_samples` held-out points (the first ones of the validation loader, the same every
epoch) and as many samples of G (latent codes from a fixed seed, the same every epoch), in the
module's cost: `val/w_lower` <= W_c(held-out, samples) <= `val/w_upper`, with `val/w_num_samples`.
`val/w_upper` is the cost of a feasible coupling, certified whatever the solver's accuracy.
`val/objective_is_upper_bound` is 1 for "entropic" and 0 for "sinkhorn_divergence", so the logs
themselves say whether the training curve may be read as a bound. The test split logs the same
under `test/`.

Matching data and samples (`transport_batch_size` = N): each training step solves an N x N
problem between the FIRST N points of the loader batch (the loader shuffles, so they are a
uniformly random subset of it; the rest of the batch is unused) and N fresh samples of G. With
N = None the whole loader batch is used (N = its size B). A loader batch with B < N is refused
(set the datamodule's batch_size >= N), except the short last batch of an epoch, which is
matched with B samples.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from geomloss import SamplesLoss
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.sinkhorn import wasserstein_bracket
from lightning_modules.base import GenerativeModule
from lightning_modules.losses import PriorName, check_choice
from lightning_modules.networks import build_decoder

TRANSPORT_COSTS: tuple[str, ...] = ("l2sq", "l2")
OBJECTIVES: tuple[str, ...] = ("entropic", "sinkhorn_divergence")
# The honest log names: OT_eps is an upper bound on W_c, the debiased divergence is not.
LOG_NAMES: dict[str, str] = {"entropic": "ot_entropic", "sinkhorn_divergence": "sinkhorn_divergence"}
IS_UPPER_BOUND: dict[str, bool] = {"entropic": True, "sinkhorn_divergence": False}


def temperature(blur: float, cost: str = "l2") -> float:
    """The entropic temperature eps of a blur radius: 2 blur^2 for l2sq, blur for l2 (SPEC 5)."""
    check_choice("cost", cost, TRANSPORT_COSTS)
    if not blur > 0:
        raise ValueError(f"blur must be a positive number (a distance in data units), got {blur}.")
    return 2.0 * blur**2 if cost == "l2sq" else float(blur)


def transport_loss(
    x: Tensor,
    y: Tensor,
    cost: str = "l2",
    blur: float = 0.05,
    objective: str = "entropic",
    scaling: float = 0.5,
) -> Tensor:
    """OT_eps(x, y) (objective="entropic", debias off: >= W_c(x, y)) or the Sinkhorn divergence
    S_eps(x, y) (objective="sinkhorn_divergence": debiased, not a bound) between the uniform
    empirical measures of x (n, ...) and y (m, ...), flattened to vectors, by geomloss.

    cost "l2sq" = |x - y|^2 (eps = 2 blur^2), "l2" = |x - y| (eps = blur); see the module
    docstring for geomloss's conventions. Differentiable in x and y. Returns a scalar tensor in
    the dtype of the inputs.
    """
    check_choice("cost", cost, TRANSPORT_COSTS)
    check_choice("objective", objective, OBJECTIVES)
    temperature(blur, cost)
    if not 0 < scaling < 1:
        raise ValueError(f"scaling is the ratio between successive blur radii, in (0, 1), got {scaling}.")
    if x.ndim < 2 or y.ndim < 2 or x.shape[1:].numel() != y.shape[1:].numel() or not len(x) or not len(y):
        raise ValueError(
            f"transport_loss needs two non-empty sample sets (n, ...) and (m, ...) with the same number of "
            f"features per sample, got shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    x2, y2 = x.flatten(start_dim=1), y.flatten(start_dim=1)  # (n, D), (m, D)
    p = 2 if cost == "l2sq" else 1
    loss = SamplesLoss(
        "sinkhorn", p=p, blur=blur, debias=objective == "sinkhorn_divergence", scaling=scaling, backend="tensorized"
    )
    grad_mode = torch.is_grad_enabled()
    try:  # geomloss 0.3.1 ends with set_grad_enabled(True), also under torch.no_grad(): restore the mode
        value = loss(x2.contiguous(), y2.contiguous())  # |x-y|^2 / 2 at eps = blur^2 (p=2), |x-y| at blur (p=1)
    finally:
        torch.set_grad_enabled(grad_mode)
    return 2.0 * value if cost == "l2sq" else value


class SinkhornGenerator(GenerativeModule):
    """A generator trained by minimising an entropic OT loss to the data (see the module docstring).

    Args:
        data_shape: shape of one sample, (C, H, W) or (D,); the CLI links it from the datamodule.
        latent_dim: dimension of the generator's input z ~ prior.
        cost: "l2" (|x - y| on flattened samples; the default: a metric, as the chain of SPEC 4
            needs, and a matching error across modes pulls a sample with unit force, not with
            the square of the distance) or "l2sq" (|x - y|^2).
        objective: "entropic" (OT_eps, debias off: an upper bound on W_c, logged as
            `train/ot_entropic`) or "sinkhorn_divergence" (debiased: better gradients, NOT a bound,
            logged as `train/sinkhorn_divergence`).
        blur: blur radius in data units; temperature eps = 2 blur^2 (l2sq) or blur (l2).
        scaling: geomloss's eps-scaling ratio in (0, 1) (0.5 is geomloss's default); closer to 1
            is more accurate and slower (about log(diameter / blur) / log(1 / scaling) Sinkhorn
            steps per loss).
        transport_batch_size: N, the size of each step's transport problem (None: the loader
            batch); N generated samples against the first N points of the loader batch.
        width, generator_channels, output_activation: the generator, as in the other models
            (`build_decoder`; "auto" = tanh for images, none for vectors).
        lr, betas: Adam settings of the generator.
        final_lr: None (constant lr) or the lr reached at the last step by an exponential decay
            from `lr` over the run (the minibatch matching is noisy: a decay averages it out).
        val_num_samples: held-out points (and as many samples) for the certified bracket.
        val_tol, val_max_seconds: target relative width and time budget of that bracket.
        val_seed: seed of the latent codes of the validation samples.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 16,
        cost: Literal["l2sq", "l2"] = "l2",
        objective: Literal["entropic", "sinkhorn_divergence"] = "entropic",
        blur: float = 0.05,
        scaling: float = 0.5,
        transport_batch_size: int | None = None,
        prior: PriorName = "gaussian",
        width: int = 64,
        generator_channels: list[int] | None = None,
        lr: float = 1e-3,
        final_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        output_activation: Literal["auto", "tanh", "none"] = "auto",
        val_num_samples: int = 1000,
        val_tol: float = 0.01,
        val_max_seconds: float | None = 30.0,
        val_seed: int = 0,
    ) -> None:
        super().__init__(data_shape, latent_dim, prior)
        self.save_hyperparameters()
        check_choice("cost", cost, TRANSPORT_COSTS)
        check_choice("objective", objective, OBJECTIVES)
        self.eps = temperature(blur, cost)
        if not 0 < scaling < 1:
            raise ValueError(f"scaling is geomloss's ratio between successive blur radii, in (0, 1), got {scaling}.")
        if transport_batch_size is not None and transport_batch_size < 1:
            raise ValueError(f"transport_batch_size must be a positive integer or None (the loader batch), "
                             f"got {transport_batch_size}.")
        if not lr > 0 or (final_lr is not None and not final_lr > 0):
            raise ValueError(f"lr and final_lr must be positive (final_lr None: constant lr), got {lr} and {final_lr}.")
        if val_num_samples < 1:
            raise ValueError(f"val_num_samples must be a positive integer, got {val_num_samples}.")
        if not 0 < val_tol < 1:
            raise ValueError(f"val_tol is a relative width in (0, 1), got {val_tol}.")
        if val_max_seconds is not None and not val_max_seconds > 0:
            raise ValueError(f"val_max_seconds must be positive or None (no limit), got {val_max_seconds}.")
        self.decoder = build_decoder(
            self.data_shape, latent_dim, width, generator_channels, self.resolve_output_activation(output_activation)
        )
        self.log_name = LOG_NAMES[objective]
        self.objective_is_upper_bound = IS_UPPER_BOUND[objective]
        self._eval_real: list[Tensor] = []

    # ---- the objective ------------------------------------------------------------------------

    def transport_objective(self, real: Tensor, fake: Tensor) -> Tensor:
        """The training objective between a data batch (n, *data_shape) and samples (m, *data_shape):
        OT_eps (>= W_c) or the Sinkhorn divergence (not a bound), in the module's cost."""
        hp = self.hparams
        return transport_loss(real, fake, hp.cost, hp.blur, hp.objective, hp.scaling)

    def describe_objective(self) -> str:
        """One sentence saying what the training objective is and whether it bounds W_c."""
        hp = self.hparams
        if self.objective_is_upper_bound:
            return (f"objective 'entropic': OT_eps with debias off (cost {hp.cost}, eps = {self.eps:.4g}), an upper "
                    f"bound on W_c (hence on the f-WAE), logged as {self.log_name}")
        return (f"objective 'sinkhorn_divergence': the debiased Sinkhorn divergence (cost {hp.cost}, eps = "
                f"{self.eps:.4g}), NOT a bound on W_c (it can be far below it), logged as {self.log_name}")

    def transport_batch(self, real: Tensor, batch_idx: int) -> Tensor:
        """The data side of a step's transport problem: the first N points of the loader batch."""
        size = self.hparams.transport_batch_size
        if size is None or real.shape[0] >= size:
            return real if size is None else real[:size]
        num_batches = self.trainer.num_training_batches if self._trainer is not None else float("inf")
        if batch_idx < num_batches - 1:  # only the last batch of an epoch may be short
            raise ValueError(
                f"SinkhornGenerator matches transport_batch_size={size} generated samples with as many data points "
                f"from one loader batch, but the loader gave a batch of {real.shape[0]}. Set the datamodule's "
                f"batch_size to at least {size} (--data.init_args.batch_size {size}) or lower "
                f"transport_batch_size (None uses the loader batch as it is)."
            )
        return real

    # ---- training -----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        rank_zero_info(f"SinkhornGenerator: {self.describe_objective()}. val/w_lower, val/w_upper: certified bracket "
                       f"on W_c({self.hparams.cost}) between held-out data and samples.")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = self.transport_batch(self.batch_data(batch), batch_idx)  # (N, *data_shape)
        optimizer = self.optimizers()
        fake = self.decode(self.sample_latent(real.shape[0]))  # (N, *data_shape)
        loss = self.transport_objective(real, fake)
        self.check_finite(f"train/{self.log_name}", loss)  # stops before a non-finite step changes weights
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log(f"train/{self.log_name}", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.decoder.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        if hp.final_lr is None:
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError("final_lr decays the lr over the run, so the run needs a length: set trainer.max_epochs "
                             "or trainer.max_steps, or final_lr None (constant lr).")
        steps = max(1, int(steps))
        rate = (hp.final_lr / hp.lr) ** (1.0 / steps)  # lr * rate^step reaches final_lr at the last step
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rate ** min(step, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation: the objective, and the certified bracket on W_c ---------------------------

    def on_validation_epoch_start(self) -> None:
        self._eval_real = []

    def on_test_epoch_start(self) -> None:
        self._eval_real = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_eval("val", batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_eval("test", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_bracket("val")

    def on_test_epoch_end(self) -> None:
        self._log_bracket("test")

    def _per_rank(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        return -(-self.hparams.val_num_samples // world)

    def _shared_eval(self, split: str, batch: Any, batch_idx: int) -> None:
        real = self.batch_data(batch)  # (B, *data_shape)
        wanted = self._per_rank() - sum(len(r) for r in self._eval_real)
        if wanted > 0:
            self._eval_real.append(real[:wanted].detach())
        size = self.hparams.transport_batch_size
        real = real if size is None else real[:size]
        # Seeded per batch and rank: the same value every epoch for the same model, training RNG untouched.
        seed = self.hparams.val_seed + 1 + batch_idx + 100_003 * self.global_rank
        fake = self.sample(real.shape[0], generator=torch.Generator().manual_seed(seed))
        value = self.transport_objective(real, fake)
        self.log(f"{split}/{self.log_name}", value, prog_bar=True, sync_dist=True, batch_size=real.shape[0])

    @torch.no_grad()
    def _log_bracket(self, split: str) -> None:
        trainer = self.trainer
        if trainer.sanity_checking or not self._eval_real:
            return
        real = torch.cat(self._eval_real)  # (n_rank, *data_shape)
        self._eval_real = []
        if trainer.world_size > 1:  # every rank's held-out points, the same count from each
            count = int(self.all_gather(torch.tensor(len(real), device=self.device)).min())
            real = self.all_gather(real[:count].contiguous()).flatten(0, 1)  # (world * count, *data_shape)
        real = real[: self.hparams.val_num_samples]
        bracket = None
        if trainer.is_global_zero:  # one solve, broadcast: ranks agree even if the time budget cuts it
            fake = self.sample(len(real), generator=torch.Generator().manual_seed(self.hparams.val_seed))
            bracket = wasserstein_bracket(
                real,
                fake,
                cost=self.hparams.cost,
                tol=self.hparams.val_tol,
                max_seconds=self.hparams.val_max_seconds,
                exact="auto",  # POT's exact solver for small sets when installed: Sinkhorn is slow on tight 2-D clusters
            )
            bracket = (bracket.lower, bracket.upper, float(bracket.n))
        lower, upper, n = trainer.strategy.broadcast(bracket, src=0)
        self.log(f"{split}/w_lower", lower, sync_dist=False)
        self.log(f"{split}/w_upper", upper, sync_dist=False)
        self.log(f"{split}/w_num_samples", n, sync_dist=False)
        self.log(f"{split}/objective_is_upper_bound", float(self.objective_is_upper_bound), sync_dist=False)
