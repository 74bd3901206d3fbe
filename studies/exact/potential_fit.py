"""Part 5: does fitting the data critic to the exact dual's potentials close its slack?

On samples, the exact dual V = GAN_{lambda f}(X, Y; H_c) is attained (up to the bracket's width) by the
critic whose values are the potentials u on the x_i and h on the y_j of
`transport.inf_convolution.inf_convolution_potentials`: the values of one 1-Lipschitz function, so a
1-Lipschitz network could take them exactly. With G frozen (the reference job's trained G), a fresh
data critic of the model's class (spectrally normalised, MaxMin, read through lambda f) is trained with
the same number of gradient steps in four ways, from the same initial weights:

- `plain`: the usual critic steps (ascent of the dual value on training batches against fresh samples);
- `batch`: regression (mean squared error of h) onto the exact potentials of each training batch and
  its fresh samples, computed afresh at every step;
- `init`: half the steps regression onto the potentials of a separate fit pair (n training points
  against n fresh samples), then half the steps plain; `init_only` is its value after the regression;
- `oracle`: regression onto the potentials of the evaluation pair (X, Y) itself: not a training method
  (it is told the answer on the points it is scored on), but how much of V the class certifies when
  shown the optimal critic.

Every arm is scored by the certified dual value on (X, Y) (`Critic.certified_value`): a lower bound
on V whatever the training did, so every number here is certified. `shifted` is the same critic with
its constant re-fitted on the fit pair (`runs.shift_calibrated`): a regressed critic's errors enter
(lambda f)*(h) exponentially for kl at small lambda, and a constant is cheap to fix.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch

from studies.chain.settings import COST, THEOREM_SLACK

ARMS = ("plain", "batch", "init", "oracle")
BATCH_TOL, BATCH_SECONDS = 0.05, 5.0  # the per-batch potentials: a looser bracket, computed every step


def fresh_critic(model: Any, divergence: str, lam: float) -> Any:
    """A critic of the model's class (the data critic's network settings) read through lambda f."""
    from lightning_modules.critic import Critic
    from lightning_modules.networks import build_critic
    from maths.divergences import get_divergence

    hp = model.hparams
    network = build_critic(model.data_shape, hp.critic_width, hp.critic_channels, hp.critic_depth, spectral_norm=True,
                           activation=hp.critic_activation)
    return Critic(network, get_divergence(divergence, lam), model.data_shape)


def certified(critic: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(certified dual value on (x, y), certified Lipschitz bound of the network), in float64."""
    c = copy.deepcopy(critic).double().eval()
    bound = c.network_bound()
    return float(c.certified_value(x, y, bound)), bound


def regression_step(critic: Any, optimizer: Any, points: torch.Tensor, targets: torch.Tensor) -> None:
    """One step of mean squared error between h = critic.value(points) and the potentials `targets`."""
    loss = (critic.value(points) - targets).pow(2).mean()
    if not torch.isfinite(loss):
        return
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def train_arm(arm: str, critic: Any, model: Any, batches: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              steps: int, fit_set: tuple[torch.Tensor, torch.Tensor], eval_set: tuple[torch.Tensor, torch.Tensor],
              divergence: str, lam: float, eval_pair: tuple[torch.Tensor, torch.Tensor],
              calibration: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Train `critic` by one arm (module docstring) for `steps` gradient steps; returns its scores: the
    certified value on `eval_pair`, the network's bound, and the certified value with the critic's
    constant re-fitted on the `calibration` pair (`runs.shift_calibrated`)."""
    from studies.exact.runs import shift_calibrated
    from transport.inf_convolution import inf_convolution_potentials

    hp = model.hparams
    optimizer = torch.optim.Adam(critic.parameters(), lr=hp.critic_lr, betas=tuple(hp.betas))
    generator = torch.Generator().manual_seed(4242)
    out: dict[str, float] = {"skipped": 0}
    critic.train()
    for step in range(steps):
        if arm == "oracle" or (arm == "init" and step < steps // 2):
            points, targets = eval_set if arm == "oracle" else fit_set
            pick = torch.randint(len(points), (min(256, len(points)),), generator=generator)
            regression_step(critic, optimizer, points[pick], targets[pick])
            continue
        if arm == "init" and step == steps // 2:
            out["init_only"] = certified(critic, *eval_pair)[0]
            critic.train()
        x, fake = batches()
        if arm == "batch":
            u, h, _ = inf_convolution_potentials(x.double(), fake.double(), divergence, lam, COST, tol=BATCH_TOL,
                                                 max_seconds=BATCH_SECONDS)
            regression_step(critic, optimizer, torch.cat([x, fake]), torch.cat([u, h]).float())
        else:
            loss = critic.loss(x, fake)[0]
            if not torch.isfinite(loss):  # kl at small lambda: (lambda f)*(h) overflows; skip the step
                out["skipped"] += 1
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in critic.parameters()):
        return {**out, "certified": math.nan, "network_bound": math.nan, "shifted": math.nan}
    value, bound = certified(critic, *eval_pair)
    return {**out, "certified": value, "network_bound": bound, "shifted": shift_calibrated(critic, calibration, *eval_pair)}


def run_fit(job: dict) -> dict:
    """`fit_run`, with a failure reported as a row (`error`) instead of ending the study."""
    try:
        return fit_run(job)
    except Exception as err:  # noqa: BLE001: one failed fit must not lose the others
        return {"dataset": job["dataset"], "divergence": job["divergence"], "lambda": job["lambda"],
                "error": f"{type(err).__name__}: {err}"}


def fit_run(job: dict) -> dict:
    """Part 5 for one (dataset, f, lambda) on the reference job's frozen G; runs in a worker process."""
    from benchmarks import common
    from studies.exact.runs import build, calibration_pair, generated, load_data
    from transport.inf_convolution import inf_convolution_potentials

    common.quiet_worker(1)
    start = time.time()
    datamodule, real = load_data(job["dataset"], job["data"])
    model = build(job, datamodule)
    model.load_state_dict(job["state"])
    model.eval()
    divergence, lam, n = job["divergence"], job["lambda"], len(real)
    x, y = real.double(), generated(model, n)  # the reference job's fixed samples
    u, h, bracket = inf_convolution_potentials(x, y, divergence, lam, COST, tol=job["tol"], max_seconds=60.0)
    fit_x, fit_y = calibration = calibration_pair(model, datamodule, n)
    uf, hf, _ = inf_convolution_potentials(fit_x, fit_y, divergence, lam, COST, tol=job["tol"], max_seconds=60.0)
    fit_set = (torch.cat([fit_x, fit_y]).float(), torch.cat([uf, hf]).float())
    eval_set = (torch.cat([x, y]).float(), torch.cat([u, h]).float())
    loader = {"iterator": iter(())}

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch (restarting the loader when it runs out) and as many fresh samples of G."""
        batch = next(loader["iterator"], None)
        if batch is None:
            loader["iterator"] = iter(datamodule.train_dataloader())
            batch = next(loader["iterator"])
        with torch.no_grad():
            return batch[0], model.sample(len(batch[0]))

    row: dict[str, Any] = {"dataset": job["dataset"], "divergence": divergence, "lambda": lam, "steps": job["steps"],
                           "n": n, "link_lower": bracket.lower, "link_upper": bracket.upper}
    for arm in ARMS:
        torch.manual_seed(job["seed"])  # the same initial critic and batch order for every arm
        loader["iterator"] = iter(())
        arm_start = time.time()
        scores = train_arm(arm, fresh_critic(model, divergence, lam), model, batches, job["steps"], fit_set, eval_set,
                           divergence, lam, (x, y), calibration)
        for key, value in scores.items():
            row[f"{arm}_{key}" if key != "init_only" else "init_only"] = value
        row[f"{arm}_fraction"] = scores["certified"] / bracket.upper
        row[f"{arm}_seconds"] = time.time() - arm_start
        best = max(scores["certified"], scores["shifted"])
        if math.isfinite(best) and best > bracket.upper + THEOREM_SLACK * max(1.0, abs(bracket.upper)):
            raise AssertionError(f"{job['dataset']} {divergence} lambda {lam} {arm}: certified value "
                                 f"{best!r} above the exact dual's upper end {bracket.upper!r}")
    row["seconds"] = time.time() - start
    return row
