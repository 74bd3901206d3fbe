"""One trained PrimalDual against the exact dual on its samples, and the exact dual on a fixed generator.

A job trains a PrimalDual by the chain study's recipe (`studies.chain`: the dataset's config, a
Gaussian encoder trained on the critic-free Monte Carlo estimate, a MaxMin data critic, the injective
generator on the ring), refines its critic and encoder against the frozen final G
(`studies.chain.refinement`), and evaluates on the held-out points X and n samples Y of G
(`studies.chain.evaluation.evaluate`: dual raw and certified, primal MC and critic, exact W_c and its
certified bracket). On the SAME (X, Y) it adds the certified bracket on the exact dual
V = GAN_{lambda f}(X, Y; H_c) (`transport.inf_convolution.inf_convolution_bracket`) and checks the two
theorems of the dual side on these samples: dual_cert <= V <= W_c(X, Y) + lambda f(1).

The reference job (one f and lambda per dataset) also evaluates V at every lambda and f on its fixed
samples, for its trained G and for the same G at initialisation, so that the limit V -> W_c as lambda
grows is seen on fixed samples, free of training noise; it returns the weights of its model for the
critic fits of `potential_fit`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from studies.chain.settings import COST, EVAL_SEED, RING_STD, THEOREM_SLACK, held_out, load_settings, make_datamodule

SETTINGS_OF = {"gaussians": "gaussians", "digits": "digits", "mnist": "digits"}  # MNIST: the digits config's model
LINK_SECONDS = 60.0
CALIBRATION_SEED = 777  # the latent draws of the calibration pair's samples of G


def mnist_datamodule(data_dir: str, n_train: int, n_eval: int, batch_size: int) -> Any:
    """MNIST (`datamodules.MNISTDataModule`, seed 0) with its training split cut to its first `n_train`
    images and its validation split to its first `n_eval`, both held in memory as tensors."""
    from torch.utils.data import TensorDataset

    from datamodules import MNISTDataModule

    datamodule = MNISTDataModule(data_dir=data_dir, batch_size=batch_size, seed=0)
    datamodule.setup("fit")

    def in_memory(dataset: Any, n: int) -> TensorDataset:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        return TensorDataset(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))

    datamodule.train_set = in_memory(datamodule.train_set, n_train)  # setup() now keeps these
    datamodule.val_set = in_memory(datamodule.val_set, n_eval)
    return datamodule


def load_data(dataset: str, data: dict) -> tuple[Any, torch.Tensor]:
    """(datamodule, held-out points X): the chain's ring (std RING_STD) or digits, or the MNIST subset;
    X is the first data["n_eval"] validation points."""
    if dataset == "mnist":
        datamodule = mnist_datamodule(data["mnist_dir"], data["n_train"], data["n_eval"], data["batch_size"])
    else:
        datamodule = make_datamodule(dataset, load_settings(dataset)[1], RING_STD if dataset == "gaussians" else None)
    return datamodule, held_out(datamodule)[: data["n_eval"]]


def build(job: dict, datamodule: Any) -> Any:
    """The job's PrimalDual (the chain's `build_model`: MaxMin critic, MC training estimator), seeded."""
    import lightning as L

    from studies.chain.training import build_model

    model_args = {**load_settings(SETTINGS_OF[job["dataset"]])[0], **job["data"].get("model_overrides", {})}
    chain_job = {"kind": "primal_dual", "dataset": job["dataset"], "divergence": job["divergence"],
                 "lambda": job["lambda"], "alpha": model_args["alpha"], "training_estimator": "monte_carlo",
                 "critic_activation": "maxmin"}
    L.seed_everything(job["seed"], verbose=False)
    return build_model(chain_job, datamodule, model_args)


@torch.no_grad()
def generated(model: Any, n: int, seed: int = EVAL_SEED) -> torch.Tensor:
    """The n samples of G that `studies.chain.evaluation.evaluate` uses (float64, the same latent draws)."""
    from maths.priors import sample_prior

    m = copy.deepcopy(model).double().eval()
    z = sample_prior(m.prior, n, m.latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return m.decode(z)


def link(x: torch.Tensor, y: torch.Tensor, divergence: str, lam: float, tol: float) -> dict[str, Any]:
    """The certified bracket on the exact dual V between x and y, as columns."""
    from transport.inf_convolution import inf_convolution_bracket

    b = inf_convolution_bracket(x, y, divergence, lam, COST, tol=tol, max_seconds=LINK_SECONDS)
    return {"link_lower": b.lower, "link_upper": b.upper, "link_width": b.relative_width, "link_converged": b.converged,
            "link_transport": b.transport, "link_penalty": b.penalty, "link_off_support": b.off_support,
            "link_floor": b.floor, "link_seconds": b.seconds}


def calibration_pair(model: Any, datamodule: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n training points and n fresh samples of G (latent seed CALIBRATION_SEED), float64: data that the
    evaluation pair (X, Y) does not contain, for fitting a critic's constant or its regression targets."""
    train = torch.cat([batch[0] for batch in datamodule.train_dataloader()])
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:n]
    return train[pick].double(), generated(model, n, CALIBRATION_SEED)


def shift_calibrated(critic: Any, calibration: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> float:
    """The certified dual value on (x, y) of the critic whose output v = r / max(1, L) + v0 is shifted by
    the constant t that maximises its dual value on the calibration pair (a constant keeps Lip(h) <= 1,
    so this is certified too). kl in closed form, t = -lambda log mean exp(v(y') / lambda - 1); other rows
    by a bounded scalar search."""
    from scipy.optimize import minimize_scalar

    c = copy.deepcopy(critic).double().eval()
    div, scale = c.divergence, max(1.0, c.network_bound())
    with torch.no_grad():
        v_cal = [c(p) / scale + div.neutral_output for p in calibration]
        v_x, v_y = c(x) / scale + div.neutral_output, c(y) / scale + div.neutral_output

        def value(v_p: torch.Tensor, v_q: torch.Tensor, t: float) -> float:
            return float(div.activation(v_p + t).mean() - div.conjugate_of_activation(v_q + t).mean())

        if div.name == "kl":
            lam = div.scale
            t = -lam * float(torch.logsumexp(v_cal[1] / lam - 1.0, 0) - math.log(len(v_cal[1])))
        else:
            span = float(torch.cat(v_cal).abs().max()) + 10.0 * div.scale
            t = minimize_scalar(lambda t: -value(*v_cal, t), bounds=(-span, span), method="bounded").x
        return value(v_x, v_y, t)


def fixed_generator_rows(x: torch.Tensor, y: torch.Tensor, generator: str, lambdas: list[float],
                         divergences: list[str], tol: float) -> list[dict]:
    """V at every (f, lambda) on fixed samples (x, y), beside W_c(x, y) exact and its certified bracket, and
    the mean nearest-neighbour cost mean_i min_j c(x_i, y_j), the limit of V as lambda -> 0 for kl and
    pearson (P' may put each x_i's mass on its nearest y_j; every other P' costs at least that)."""
    from studies.chain.evaluation import transport_values
    from transport.costs import cost

    w = transport_values(x, y)
    w["nearest_neighbour"] = float(torch.stack([cost(xi[None].expand_as(y), y, COST).min() for xi in x]).mean())
    rows = []
    for divergence in divergences:
        for lam in lambdas:
            row = {"generator": generator, "divergence": divergence, "lambda": lam, **w, **link(x, y, divergence, lam, tol)}
            row["theorem_ok"] = row["link_lower"] <= row["w_exact"] + row["link_floor"] + THEOREM_SLACK * max(1.0, row["w_exact"])
            rows.append(row)
    return rows


def run_trained(job: dict) -> dict:
    """`trained_run`, with a failure reported as a row (`error`) instead of ending the study."""
    try:
        return trained_run(job)
    except Exception as err:  # noqa: BLE001: one failed run must not lose the others
        row = {k: job[k] for k in ("dataset", "divergence", "lambda", "seed")}
        return {"row": {**row, "error": f"{type(err).__name__}: {err}"}, "fixed": []}


def finite(module: Any) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def trained_run(job: dict) -> dict:
    """Train, refine and evaluate one (dataset, f, lambda); runs in a worker process."""
    from benchmarks import common
    from studies.chain.evaluation import evaluate
    from studies.chain.refinement import refine_critic, refine_encoder

    common.quiet_worker(1)
    start = time.time()
    data = job["data"]
    datamodule, real = load_data(job["dataset"], data)
    model = build(job, datamodule)
    x = real.double()
    untrained = generated(model, len(x)) if job["reference"] else None  # G at initialisation
    trainer = common.bare_trainer(max_epochs=data["epochs"], limit_train_batches=data["train_batches"],
                                  limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    model.eval()
    trained_critic = copy.deepcopy(model.critic.state_dict())
    refine_critic(model, datamodule, data["refine_steps"], job["seed"])
    critic_refined = finite(model.critic)  # the chain's refinement has no guard against a non-finite loss
    if not critic_refined:  # (kl at small lambda: (lambda f)*(h) = lambda exp(h / lambda - 1) overflows)
        model.critic.load_state_dict(trained_critic)
    refine_encoder(model, datamodule, data["encoder_steps"], job["seed"], batch_size=data["encoder_batch"])
    row = evaluate(model, real)
    y = generated(model, len(x))
    same = float(copy.deepcopy(model).double().eval().critic.certified_value(x, y))
    if abs(same - row["dual_cert"]) > 1e-9 * max(1.0, abs(same)):  # the exact dual must see evaluate's samples
        raise AssertionError(f"samples differ from evaluate's: certified value {same} != {row['dual_cert']}")
    row["dual_cert_shifted"] = shift_calibrated(model.critic, calibration_pair(model, datamodule, len(x)), x, y)
    row.update(link(x, y, job["divergence"], job["lambda"], job["tol"]))
    slack = THEOREM_SLACK * max(1.0, row["w_exact"])
    row["dual_cert_le_link"] = max(row["dual_cert"], row["dual_cert_shifted"]) <= row["link_upper"] + slack  # in H_c
    row["link_le_w"] = row["link_lower"] <= row["w_exact"] + row["link_floor"] + slack  # theorem: P' = Q^
    row["fraction_of_exact"] = row["dual_cert"] / row["link_upper"]  # <= dual_cert / V (V <= link_upper)
    row["fraction_of_exact_high"] = row["dual_cert"] / row["link_lower"] if row["link_lower"] > 0 else float("nan")
    row["critic_refined"] = critic_refined  # False: the refinement diverged, the trained critic is kept
    result = {**{k: job[k] for k in ("dataset", "divergence", "lambda", "seed")}, "n": len(x),
              "steps": trainer.fit_loop.epoch_loop.batch_progress.total.completed, **row}
    out: dict[str, Any] = {"row": result, "fixed": []}
    if job["reference"]:
        for label, samples in ((f"trained ({job['divergence']}, lambda {job['lambda']:g})", y), ("untrained", untrained)):
            out["fixed"] += [{"dataset": job["dataset"], **r} for r in fixed_generator_rows(
                x, samples, label, job["lambdas"], job["divergences"], job["tol"])]
        out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result["seconds"] = time.time() - start
    return out
