"""The inequality chain of the primal-dual link, measured on trained PrimalDual models (SPEC 4, 5).

For c = l2 (a metric; per sample, the Euclidean norm of the flattened difference) and lambda > 0:

    dual  GAN_{lambda f}(P_X, G; H_c)  <=  primal  fWAE_{c,lambda}(P_X, G)  <=  W_c(P_X, P_G)
                                                                           <=  upper (certified Sinkhorn)

For every (dataset, divergence f, lambda, seed) one PrimalDual (alpha from the dataset's config, a
Gaussian encoder, `primal_estimator="monte_carlo"`) is trained, and at every `eval_every` epochs and
at the end the following are computed in float64 on the SAME n held-out points X (the validation
set) and the SAME n generated points Y = G(z), z from a fixed seed:

- dual (raw): E_X[h] - E_Y[(lambda f)*(h)] with the trained critic h = lambda g_f(v / lambda);
- dual (certified): the same for v / max(1, L), L the certified Lipschitz bound of v
  (`PrimalDual.certified_dual_value`, `val/dual_lower_bound`): a critic in H_c, so

      dual_cert(X, Y) <= W_c(X, Y)      is a THEOREM (Kantorovich-Rubinstein and f*(t) >= t + f(1));

  the script asserts it at every evaluation: a violation is a bug, reported as such;
- primal (MC): mean_X c(x, G(z_x)) (one draw z_x of the Gaussian encoder per point) + lambda *
  D_f(Q_X || P_Z) by the critic-free Monte Carlo estimate for the mixture Q_X of the n codes
  (`monte_carlo_divergence`): unbiased for that mixture, biased UPWARDS for the population Q_Z
  (a mixture of n narrow Gaussians is spiky), no adversary in it;
- primal (critic): the same reconstruction + lambda * the latent critic's variational estimate
  (a lower estimate of D_f, clamped at f(1)), the estimate the encoder is trained on;
- W_c exact: POT's network simplex between X and Y (`callbacks.sinkhorn.exact_wasserstein`);
- bracket: `callbacks.sinkhorn.wasserstein_bracket(X, Y)`, lower <= W_c(X, Y) <= upper, certified
  (also asserted).

`dual <= primal` and `primal <= W_c` hold for the population quantities (the primal for the
OPTIMAL encoder, with D_f exact); here both sides are estimates, so they hold up to estimation
error: the tables give standard errors (per run) and the spread over seeds.

What lambda does (the hint of the issue, checked): GAN_{lambda f}(H_c) = inf_P' W_c(P_X, P') +
lambda D_f(P' || P_G) is at most lambda D_f(P_X || P_G) and tends to W_c(P_X, P_G) as lambda grows
(WGAN); the f-WAE is at most its value at a good encoder and tends to the constrained WAE, equal
to W_c(P_X, P_G) for a deterministic G with a rich stochastic encoder.

Where the trained values fall short of the limits, the causes are measured, not guessed:
- the critic is h = lambda g_f(v / lambda) with Lip(v) <= 1. For jensen_shannon (also gan and
  total_variation) g_f has slope 1/2 where the optimal h sits for large lambda (h near lambda f'(1)),
  so Lip(h) <= ~1/2 there: this class's dual tends to ~W_c / 2, not W_c, while GAN_{lambda f}(H_c)
  tends to W_c. kl and pearson (g_f the identity) are not limited this way. `ceiling_table`
  computes the best value of the class for linear v on a Gaussian shift by quadrature (closed
  forms checked for kl and pearson), without training;
- a spectrally normalised network is far from the steepest 1-Lipschitz functions: the median
  |grad h| over X and Y is printed (an optimal critic has slope 1 along the transport rays);
- the critic trained beside a moving generator is a weak point of the sup that defines the dual:
  at the end, `refine_critic` runs `refine_steps` more critic steps against the FROZEN final G
  (training data, the module's own loss), and the table shows the dual after it (before it: the
  diagnostics table). Any critic is certified after the division by max(1, L);
- for kl the optimal h at P = Q is the constant lambda f'(1) = lambda, i.e. v = lambda: from the
  default initialisation (v ~ 0) Adam needs about lambda / lr steps to move the last bias there
  (5,000 at lambda = 10). The models add the constant v0 = lambda g_f^{-1}(f'(1)) to the data
  critic's output and g_f^{-1}(f'(1)) to the latent critic's (`FDivergence.neutral_output`:
  lambda and 1 for kl, 0 for jensen_shannon and pearson), so both start centred;
- the Monte Carlo D_f of the n held-out codes' mixture is biased upwards when the encoder's
  sigma is small next to the spacing of the n codes; for the 2-D data it is also computed for the
  codes of 16,000 fresh points of the known mixture (`primal MC (16k codes)`), which shows how
  much of it is finite-sample spikiness;
- the encoder trained on the latent critic's estimate (a lower estimate it can exploit) shrinks its
  sigma until the critic-free D_f explodes: `--training_estimator monte_carlo` trains the encoders on
  the batch mixture's critic-free estimate instead (files `*_mc*`), so the primal has no adversary;
- the primal is an inf over encoders, and the encoder trained beside a moving G (at the target
  lambda from the start, on batches of 100) is a weak point of it: at large lambda it stays at the
  collapsed coupling Q(z|x) ~ P_Z (sigma ~ 1, recon = E c(X, G(Z)) for an independent Z).
  `refinement.refine_encoder` runs `encoder_steps` more encoder steps against the FROZEN final G on
  the critic-free estimate, with batches of `encoder_batch` points and lambda raised from 0.1 to its
  value (continuation), and keeps the best encoder it saw by the target-lambda primal on training
  points; the table shows the primal after it (before it: the diagnostics table). The batch
  estimate's upward bias grows as sigma falls below the spacing of the B codes, and lambda
  multiplies it, so at large lambda it still keeps sigma large (ring, kl, lambda 100, 6000 steps:
  median sigma 0.66, primal 2.0x W_c): the remaining excess of the primal over W_c;
- W_c between n = 1000 points is an upward-biased estimate of W_c(P_X, P_G) (SPEC 5). For the 2-D
  data the table adds `W_c (4096 pts)` between fresh data and model points, and `W_c(X, X') floor`,
  W_c between two n-point samples of the data itself (population value 0).

The 2-D data: the ring of 8 Gaussians (radius 2) of configs/primal_dual_gaussians.yaml with
std 0.1 (`--ring_std`; the config's 0.02 makes near-atoms that an injective map from N(0, I_2)
must stretch 50-fold). Injective generator (latent_dim = data dim = 2): the config's ReLU MLP is
NOT injective in practice (det dG/dz changes sign on 18-63% of prior draws already at
initialisation, on ~12% after training), so every 2-D model here uses `InjectiveGenerator`,
injective by construction (residual blocks with contraction < 1, certified from exact operator
norms, then an invertible linear map); `--generator mlp` uses the config's MLP instead. Checked
after training: the certified contraction (< 1), and the sign of det dG/dz at 20,000 prior draws
(all positive = no fold). For digits (8 -> 64, the config's conv decoder) the smallest singular
value of dG/dz at 1,000 draws (> 0 everywhere: an immersion, locally injective).

OT-trained generator (`lightning_modules.sinkhorn_generator.SinkhornGenerator`, when the module
exists): W_c to held-out data reached, with the same generator network and the same number of
epochs and batches, by PrimalDual alpha = 1 (the f-WAE), alpha = 0 (the Lipschitz f-GAN), the
config's alpha (all three with `--compare_divergence`, `--compare_lambda`), and the
SinkhornGenerator (its entropic OT loss in c = l2, blur 0.05): exact W_c and the certified bracket
between the held-out points and as many samples.

    python benchmarks/primal_dual_chain.py --quick --workers 2   # 1 seed, short runs
    python benchmarks/primal_dual_chain.py --workers 2            # 3 seeds, the configs' epochs

Writes benchmarks/results/primal_dual_chain[_quick].md (the printed tables), .csv (one row per
run, final evaluation), _summary.csv (mean and spread over seeds per configuration), _history.csv
(the curves), _generators.csv, .json (everything, with the settings), _<dataset>.png (the curves
per configuration, first seed) and _lambda.png (dual / W_c and primal / W_c against lambda).
Timings are printed for orientation, not as results.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from refinement import refine_critic, refine_encoder  # noqa: E402

NAME = "primal_dual_chain"
COST = "l2"
CONFIGS = {
    "gaussians": os.path.join(common.ROOT, "configs", "primal_dual_gaussians.yaml"),
    "digits": os.path.join(common.ROOT, "configs", "primal_dual_digits.yaml"),
}
EVAL_SEED = 12_345  # latent codes of the generated evaluation samples: the same at every evaluation
BRACKET_TOL = 0.01
BRACKET_SECONDS = 30.0
MC_SAMPLES = 8192
RING_STD = 0.1  # the config's 0.02 makes 8 near-atoms; at 0.1 neighbouring modes are still 15 std apart
NUM_MORE = 16_000  # 2-D data: fresh points whose codes' mixture gives the less biased Monte Carlo D_f
NUM_LARGE = 4096  # 2-D data: W_c between this many fresh data and model points (POT, about 3 s)
# Tolerances of the asserted (certified) inequalities: float64 rounding only.
THEOREM_SLACK = 1e-9

QUICK = {
    "lambdas": [0.1, 1.0, 10.0, 100.0],
    "divergences": ["kl", "jensen_shannon", "pearson"],
    "seeds": [0],
    "epochs": {"gaussians": 6, "digits": 10},
    "train_batches": {"gaussians": 50, "digits": None},
    "eval_every": 3,
    "refine_steps": 300,
    "encoder_steps": {"gaussians": 2000, "digits": 1000},
}
FULL = {
    "lambdas": [0.1, 1.0, 10.0, 100.0],
    "divergences": ["kl", "jensen_shannon", "pearson"],
    "seeds": [0, 1, 2],
    "epochs": {"gaussians": 30, "digits": 40},  # the configs' max_epochs
    "train_batches": {"gaussians": None, "digits": None},
    "eval_every": 5,
    "refine_steps": 2000,
    "encoder_steps": {"gaussians": 6000, "digits": 4000},
}


# ---- settings --------------------------------------------------------------------------------------


def load_settings(dataset: str) -> tuple[dict, dict, str]:
    """(model init_args, data init_args, data class name) of the dataset's train.py config."""
    import yaml

    with open(CONFIGS[dataset]) as handle:
        config = yaml.safe_load(handle)
    return dict(config["model"]["init_args"]), dict(config["data"]["init_args"]), config["data"]["class_path"]


def make_datamodule(dataset: str, data_args: dict, ring_std: float | None = None) -> Any:
    from datamodules import DigitsDataModule, GaussianMixtureDataModule

    if dataset == "gaussians":  # the same data for every training seed
        return GaussianMixtureDataModule(**{**data_args, "seed": 0, **({"std": ring_std} if ring_std else {})})
    return DigitsDataModule(**{**data_args, "seed": 0})


def critic_centre(divergence: Any) -> float:
    """v0 with lambda g_f(v0 / lambda) = lambda f'(1): the critic output at which h is the optimal
    critic of P = Q (lambda for kl; 0 for the other rows used here). Found by bisection."""
    target = divergence.f_prime_one

    def gap(v: float) -> float:
        return float(divergence.activation(torch.tensor(v, dtype=torch.float64))) - target

    if abs(gap(0.0)) < 1e-12:
        return 0.0
    lo, hi = -1.0, 1.0
    while gap(lo) > 0:
        lo *= 2
    while gap(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


class InjectiveGenerator(nn.Module):
    """G(z) = b + exp(M) R_K(...R_1(z)), R_k(u) = u + c r_k(u): injective by construction (2-D data).

    r_k is an MLP (d -> width -> width -> d, ReLU) with spectrally normalised linear layers, so
    Lip(r_k) <= ~1, and c = 0.9: R_k is then a bi-Lipschitz bijection of R^d (u = y - c r_k(u) is a
    contraction's fixed point; Behrmann et al. 2019, invertible residual networks), and exp(M) is
    invertible. torch's spectral normalisation uses a power-iteration estimate (from below), so
    `certified_contraction` recomputes max_k c Lip(r_k) from exact operator norms: < 1 certifies
    that this G is injective.
    """
    def __init__(self, dim: int, width: int = 64, blocks: int = 4, contraction: float = 0.9) -> None:
        from lightning_modules.networks import build_mlp

        super().__init__()
        self.contraction = contraction
        self.blocks = nn.ModuleList(
            build_mlp(dim, [width, width], dim, activation="relu", spectral_norm=True) for _ in range(blocks))
        self.log_linear = nn.Parameter(torch.zeros(dim, dim))  # M: exp(M) is always invertible
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dim = dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = z  # (B, d)
        for block in self.blocks:
            u = u + self.contraction * block(u)
        return u @ torch.linalg.matrix_exp(self.log_linear).T + self.bias  # (B, d)

    def certified_contraction(self) -> float:
        """max_k c Lip(r_k) from exact operator norms (eval mode): < 1 means G is injective."""
        from lightning_modules.lipschitz import lipschitz_upper_bound

        return max(self.contraction * lipschitz_upper_bound(block, (self.dim,)) for block in self.blocks)


# ---- evaluation on fixed held-out and generated samples ---------------------------------------------


def held_out(datamodule: Any) -> torch.Tensor:
    """All validation points, (n, *data_shape)."""
    datamodule.setup("fit")
    return torch.cat([batch[0] for batch in datamodule.val_dataloader()])


def mean_and_error(terms: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error."""
    return float(terms.mean()), float(terms.std() / math.sqrt(len(terms)))


def transport(real: torch.Tensor, fake: torch.Tensor) -> dict[str, Any]:
    """Exact W_c and the certified bracket between the two sample sets, with the certified checks."""
    from callbacks.sinkhorn import exact_wasserstein, wasserstein_bracket

    exact = exact_wasserstein(real, fake, COST)
    bracket = wasserstein_bracket(real, fake, COST, tol=BRACKET_TOL, max_seconds=BRACKET_SECONDS)
    slack = THEOREM_SLACK * max(1.0, exact)
    return {
        "w_exact": exact,
        "w_lower": bracket.lower,
        "w_upper": bracket.upper,
        "bracket_width": bracket.relative_width,
        "bracket_converged": bracket.converged,
        "bracket_ok": bracket.lower <= exact + slack and exact <= bracket.upper + slack,
    }


def evaluate(model: Any, real: Any, seed: int = EVAL_SEED, more_real: Any = None) -> dict[str, Any]:
    """Every quantity of the chain, in float64, on the held-out points `real` (n, ...) and n
    generated points from latent codes drawn with `seed` (see the module docstring). With
    `more_real` (N, ...) fresh data points, the Monte Carlo D_f is also computed for the mixture of
    their N codes (`divergence_mc_more`, `primal_mc_more`): less spiky, so less biased upwards."""
    from lightning_modules.latent_divergence import monte_carlo_divergence
    from lightning_modules.lipschitz import lipschitz_upper_bound
    from lightning_modules.losses import cost, sample_prior

    m = copy.deepcopy(model).double().eval()
    x = real.double()
    n = len(x)
    lam = float(m.hparams.lambda_)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z_fake = sample_prior(m.prior, n, m.latent_dim, generator=generator, dtype=torch.float64)
        y = m.decode(z_fake)  # (n, *data_shape)

        # the dual, raw and certified, on (x, y)
        div = m.data_divergence
        net_real, net_fake = m.critic(x), m.critic(y)  # (n,), (n,): the network's part of v
        offset = div.neutral_output  # v = network + offset; only the network's part is rescaled
        network_bound = lipschitz_upper_bound(m.critic, m.data_shape)
        scale = max(1.0, network_bound)
        dual_raw, dual_raw_se = mean_and_error(div.activation(net_real + offset)
                                               - div.conjugate_of_activation(net_fake + offset))
        cert_real = div.activation(net_real / scale + offset)
        cert_fake = div.conjugate_of_activation(net_fake / scale + offset)
        dual_cert = float(cert_real.mean() - cert_fake.mean())
        module_value = float(m.certified_dual_value(x, y))  # the module's own computation, the same number
        if not math.isclose(module_value, dual_cert, rel_tol=1e-9, abs_tol=1e-9):
            raise AssertionError(f"certified_dual_value {module_value} differs from the recomputed {dual_cert}")
        dual_cert_se = math.sqrt(float(cert_real.var() + cert_fake.var()) / n)

        # how steep the critic is where it matters: an optimal 1-Lipschitz critic has slope 1 along transport rays
        with torch.enable_grad():
            points = torch.cat([x, y]).requires_grad_(True)
            (grad,) = torch.autograd.grad(div.activation(m.critic_output(points)).sum(), points)
        slope = grad.flatten(start_dim=1).norm(dim=1)  # (2n,): |grad h| of the raw critic

        # the primal: one draw of the Gaussian encoder per point
        mean, log_var = m.encode_parameters(x)  # (n, d_z) each
        z = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        recon, recon_se = mean_and_error(cost(x, m.decode(z), COST))
        mc = monte_carlo_divergence(m.latent_divergence, mean, log_var, MC_SAMPLES, m.prior,
                                    generator=torch.Generator().manual_seed(seed + 1))
        z_prior = sample_prior(m.prior, n, m.latent_dim, generator=generator, dtype=torch.float64)
        f_one = float(m.latent_divergence.f(torch.tensor(1.0, dtype=torch.float64)))
        critic_estimate = max(float(m.latent_divergence_critic(z, z_prior)), f_one)
        more, reference = None, {}
        if more_real is not None:
            more = monte_carlo_divergence(m.latent_divergence, *m.encode_parameters(more_real.double()), MC_SAMPLES,
                                          m.prior, generator=torch.Generator().manual_seed(seed + 2))
            reference = population_reference(m, more_real.double(), x, seed + 3)
    row = {
        "n": n,
        "lipschitz_bound": network_bound * div.activation_lipschitz,
        "dual_raw": dual_raw,
        "dual_raw_se": dual_raw_se,
        "dual_cert": dual_cert,
        "dual_cert_se": dual_cert_se,
        "critic_slope_median": float(slope.median()),
        "recon": recon,
        "divergence_mc": float(mc.value),
        "divergence_mc_se": float(mc.std_error),
        "divergence_critic": critic_estimate,
        "primal_mc": recon + lam * float(mc.value),
        "primal_mc_se": math.sqrt(recon_se**2 + (lam * float(mc.std_error)) ** 2),
        "primal_critic": recon + lam * critic_estimate,
        "encoder_sigma_median": float(torch.exp(0.5 * log_var).median()),
        "n_more": len(more_real) if more_real is not None else 0,
        "divergence_mc_more": float(more.value) if more is not None else math.nan,
        "primal_mc_more": recon + lam * float(more.value) if more is not None else math.nan,
        "primal_mc_more_se": math.hypot(recon_se, lam * float(more.std_error)) if more is not None else math.nan,
        **transport(x, y),
        **reference,
    }
    row["theorem_ok"] = row["dual_cert"] <= row["w_exact"] + THEOREM_SLACK * max(1.0, row["w_exact"])
    return row


def population_reference(m: Any, fresh: torch.Tensor, x: torch.Tensor, seed: int) -> dict[str, float]:
    """What the n-point W_c(X, Y) is an estimate of: `w_large`, the exact W_c between NUM_LARGE fresh
    data points and NUM_LARGE model points (closer to W_c(P_X, P_G): E W_c(samples) >= W_c(P_X, P_G),
    SPEC 5), and `w_floor`, the exact W_c between X and n other data points (the population value
    is 0: what sampling alone adds at n points)."""
    from callbacks.sinkhorn import exact_wasserstein
    from lightning_modules.losses import sample_prior

    n = len(x)
    if len(fresh) < NUM_LARGE + n:
        raise ValueError(f"population_reference needs {NUM_LARGE + n} fresh points, got {len(fresh)}")
    z = sample_prior(m.prior, NUM_LARGE, m.latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y_large = m.decode(z)  # (NUM_LARGE, *data_shape)
    return {"w_large": exact_wasserstein(fresh[:NUM_LARGE], y_large, COST),
            "w_floor": exact_wasserstein(x, fresh[-n:], COST), "n_large": NUM_LARGE}


def generator_injectivity(model: Any, num_samples: int) -> dict[str, Any]:
    """2-D -> 2-D: the sign of det dG/dz at prior draws (and, for `InjectiveGenerator`, its certified
    contraction); otherwise the smallest singular value of dG/dz."""
    from torch.func import jacrev, vmap

    m = copy.deepcopy(model).double().eval()
    z = torch.randn(num_samples, m.latent_dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def decode_one(z1: Any) -> Any:
        return m.decode(z1[None]).flatten()  # (D,)

    with torch.no_grad():
        jac = vmap(jacrev(decode_one))(z)  # (N, D, d_z)
    out: dict[str, Any] = {"generator": type(m.decoder).__name__}
    if isinstance(m.decoder, InjectiveGenerator):
        out["certified_contraction"] = m.decoder.certified_contraction()
    if jac.shape[1] == jac.shape[2]:
        det = torch.linalg.det(jac)  # (N,)
        positive = float((det > 0).double().mean())
        out.update({"det_positive_fraction": positive, "det_same_sign": positive in (0.0, 1.0),
                    "det_abs_min": float(det.abs().min()), "det_abs_median": float(det.abs().median())})
    else:
        smallest = torch.linalg.svdvals(jac)[:, -1]  # (N,)
        out.update({"min_singular_value": float(smallest.min()),
                    "median_min_singular_value": float(smallest.median())})
    return out


# ---- one training run --------------------------------------------------------------------------------


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)


def build_model(job: dict, datamodule: Any, model_args: dict) -> Any:
    """The job's SinkhornGenerator or PrimalDual (Gaussian encoder, critic-free primal, cost l2), with the
    InjectiveGenerator as G on the 2-D data unless the job asks for the config's MLP."""
    if job["kind"] == "sinkhorn":
        from lightning_modules.sinkhorn_generator import SinkhornGenerator

        model = SinkhornGenerator(data_shape=datamodule.dims, latent_dim=model_args["latent_dim"], cost=COST,
                                  width=model_args["width"], prior=model_args.get("prior", "gaussian"))
    else:
        from lightning_modules.primal_dual import PrimalDual

        model = PrimalDual(data_shape=datamodule.dims, **{
            **model_args, "divergence": job["divergence"], "lambda_": job["lambda"], "alpha": job["alpha"],
            "cost": COST, "encoder_type": "gaussian", "primal_estimator": "monte_carlo",
            "training_estimator": job.get("training_estimator", "critic"),
            **({"critic_activation": job["critic_activation"]} if job.get("critic_activation") else {})})
    if job["dataset"] == "gaussians" and job.get("generator", "injective") == "injective":
        model.decoder = InjectiveGenerator(datamodule.dims[0], width=model_args["width"] // 2)  # every model alike
    return model


def train_one(job: dict) -> dict:
    """Train one PrimalDual (or SinkhornGenerator) and evaluate it; runs in a worker process."""
    import lightning as L

    torch.set_num_threads(1)  # tiny networks: one core per worker
    quiet()
    model_args, data_args, _ = load_settings(job["dataset"])
    datamodule = make_datamodule(job["dataset"], data_args, job.get("ring_std"))
    real = held_out(datamodule)
    more_real = None
    if job["dataset"] == "gaussians":  # fresh points of the known mixture, for the less biased Monte Carlo D_f
        from datamodules.toy2d import sample_mixture

        more_real = sample_mixture(datamodule.centers, datamodule.std, NUM_MORE, torch.Generator().manual_seed(99)).tensors[0]
    L.seed_everything(job["seed"], verbose=False)
    model = build_model(job, datamodule, model_args)
    # added by the model to the critic's output
    centre = None if job["kind"] == "sinkhorn" else model.data_divergence.neutral_output
    history: list[dict] = []

    class Record(L.Callback):
        """The chain on (X, Y) every eval_every epochs, and what the module itself logged."""

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            epoch = trainer.current_epoch + 1
            if trainer.sanity_checking or (epoch % job["eval_every"] and epoch != job["epochs"]):
                return
            if job["kind"] == "sinkhorn":
                return
            row = {"epoch": epoch, **evaluate(pl_module, real, more_real=more_real if epoch == job["epochs"] else None)}
            for key in ("primal", "dual", "dual_lower_bound", "latent_divergence_mc", "latent_divergence_critic"):
                value = trainer.callback_metrics.get(f"val/{key}")
                row[f"logged_{key}"] = float(value) if value is not None else math.nan
            history.append(row)

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=job["epochs"], limit_train_batches=job["train_batches"],
        limit_val_batches=0 if job["kind"] == "sinkhorn" else None, num_sanity_val_steps=0, callbacks=[Record()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.time()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.time() - start
    model.eval()
    if job["kind"] == "sinkhorn":
        with torch.no_grad():
            fake = model.decode(torch.randn(len(real), model.latent_dim, generator=torch.Generator().manual_seed(EVAL_SEED)))
        final = transport(real.double(), fake.double())
    else:
        running = history[-1]
        refine_critic(model, datamodule, job["refine_steps"], job["seed"])
        kept_step = refine_encoder(model, datamodule, job["encoder_steps"], job["seed"], batch_size=job["encoder_batch"])
        final = evaluate(model, real, more_real=more_real)
        final["encoder_best_step"] = kept_step
        final.update({f"{key}_running": running.get(key, math.nan) for key in RUNNING_COLUMNS})
        final.update({"refine_steps": job["refine_steps"], "encoder_steps": job["encoder_steps"]})
    result = {
        **{k: job[k] for k in ("dataset", "kind", "divergence", "lambda", "alpha", "seed", "epochs", "centre")},
        "critic_centre": centre,
        "batches": trainer.fit_loop.epoch_loop.batch_progress.total.completed,
        "seconds": seconds,
        "final": final,
        "history": history,
    }
    if job["kind"] == "primal_dual" and job.get("injectivity"):
        result["injectivity"] = generator_injectivity(model, 20_000 if len(datamodule.dims) == 1 else 1_000)
    return result


# ---- the parameterisation ceiling (no training) ---------------------------------------------------------


def ceiling_table(lambdas: list[float], divergences: list[str], shift: float = 2.0) -> list[dict]:
    """Best dual value of the model's critic class h = lambda g_f(v / lambda) with v(x) = s x + b,
    |s| <= 1 (1-Lipschitz), for P = N(shift, 1), Q = N(0, 1) in 1-D (W_1 = shift; the Kantorovich
    potential is x itself), by Gauss-Hermite quadrature and a bounded optimiser over (s, b)."""
    import numpy as np
    from scipy.optimize import minimize

    from lightning_modules.divergences import get_divergence

    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()  # E over N(0, 1)
    rows = []
    for name in divergences:
        for lam in lambdas:
            div = get_divergence(name, lam)
            centre = critic_centre(div)

            def negative(params: np.ndarray) -> float:
                s, b = params
                v_p = torch.tensor(s * (nodes + shift) + b, dtype=torch.float64)
                v_q = torch.tensor(s * nodes + b, dtype=torch.float64)
                value = (weights * div.activation(v_p).numpy()).sum() - (weights * div.conjugate_of_activation(v_q).numpy()).sum()
                return -float(value)

            best = max(
                (minimize(negative, np.array([s0, centre + b0]), method="L-BFGS-B", bounds=[(-1, 1), (None, None)])
                 for s0 in (0.5, 1.0) for b0 in (0.0, -lam, lam)),
                key=lambda r: -r.fun,
            )
            rows.append({"divergence": name, "lambda": lam, "best_value": -best.fun, "slope": float(best.x[0]),
                         "value_over_w": -best.fun / shift})
            # closed forms for the identity activations: kl s d - s^2 / (2 lam), pearson s d - s^2 / (4 lam), best s
            if name in ("kl", "pearson"):
                k = 2.0 if name == "kl" else 4.0
                s = min(1.0, k * lam * shift / 2.0)
                exact = s * shift - s**2 / (k * lam)
                if abs(exact - rows[-1]["best_value"]) > 1e-5 * max(1.0, exact):
                    raise AssertionError(f"ceiling_table: {name}, lambda {lam}: quadrature {rows[-1]['best_value']} "
                                         f"!= closed form {exact}")
    return rows


# ---- summaries and tables -----------------------------------------------------------------------------


CHAIN_COLUMNS = ["dual_raw", "dual_cert", "primal_mc", "primal_mc_more", "primal_critic", "w_exact", "w_lower",
                 "w_upper", "w_large", "w_floor"]
# the last evaluation during training, before the critic and encoder refinements
RUNNING_COLUMNS = ["dual_raw", "dual_cert", "lipschitz_bound", "primal_mc", "primal_mc_more", "primal_critic", "recon",
                   "encoder_sigma_median"]
DIAGNOSTIC_COLUMNS = [*(key + "_running" for key in RUNNING_COLUMNS), "lipschitz_bound", "critic_slope_median", "recon",
                      "divergence_mc", "divergence_mc_more", "divergence_critic", "encoder_sigma_median",
                      "primal_mc_se", "dual_raw_se", "dual_cert_se", "encoder_best_step"]
# (name, larger side, smaller side): "smaller <= larger" is checked per seed
INEQUALITIES = [
    ("dual_cert<=W_c", "w_exact", "dual_cert"),
    ("dual_raw<=W_c", "w_exact", "dual_raw"),
    ("dual_cert<=primal_MC", "primal_mc", "dual_cert"),
    ("dual_raw<=primal_MC", "primal_mc", "dual_raw"),
    ("dual_raw<=primal_critic", "primal_critic", "dual_raw"),
    ("primal_MC<=W_c", "w_exact", "primal_mc"),
    ("primal_MC16k<=W_c", "w_exact", "primal_mc_more"),
    ("primal_critic<=W_c", "w_exact", "primal_critic"),
    ("W_c<=upper", "w_upper", "w_exact"),
    ("lower<=W_c", "w_exact", "w_lower"),
]


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation over seeds; nan for one seed)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pm(mean: float, sd: float, spec: str = ".3f") -> str:
    """mean ± sd (sd left out for one seed); values of 10^4 and more in scientific notation."""
    if math.isnan(mean):
        return "-"
    spec = ".2e" if abs(mean) >= 1e4 else spec
    return format(mean, spec) if math.isnan(sd) else f"{format(mean, spec)} ± {format(sd, spec)}"


def summarize(results: list[dict]) -> list[dict]:
    """One row per (dataset, divergence, lambda) of the grid: mean and spread over seeds, ratios to
    W_c, and per inequality the number of seeds where it held and the mean margin (larger - smaller)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["grid"]:
            groups.setdefault((r["dataset"], r["divergence"], r["lambda"]), []).append(r["final"])
    rows = []
    for (dataset, divergence, lam), finals in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "divergence": divergence, "lambda": lam, "seeds": len(finals)}
        for key in CHAIN_COLUMNS + DIAGNOSTIC_COLUMNS:
            row[key], row[key + "_sd"] = spread([f.get(key, math.nan) for f in finals])
        for key in ("dual_cert", "dual_raw", "primal_mc", "primal_mc_more", "primal_critic", "primal_mc_running",
                    "primal_mc_more_running"):
            row[key + "_over_w"], row[key + "_over_w_sd"] = spread([f.get(key, math.nan) / f["w_exact"] for f in finals])
            row[key + "_over_w_large"], row[key + "_over_w_large_sd"] = spread(
                [f.get(key, math.nan) / f.get("w_large", math.nan) for f in finals])
        for name, larger, smaller in INEQUALITIES:
            margins = [f[larger] - f[smaller] for f in finals if math.isfinite(f[larger] - f[smaller])]
            row[f"held[{name}]"] = f"{sum(m >= 0 for m in margins)}/{len(margins)}" if margins else "-"
            row[f"margin[{name}]"] = statistics.fmean(margins) if margins else math.nan
        # primal - dual in standard errors (the two estimates use independent draws)
        row["z[primal_MC-dual_raw]"] = statistics.fmean(
            (f["primal_mc"] - f["dual_raw"]) / math.hypot(f["primal_mc_se"], f["dual_raw_se"]) for f in finals)
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["divergence"], r["lambda"]))
    return rows


def chain_table(rows: list[dict]) -> str:
    header = ["data", "f", "lambda", "dual cert", "dual raw", "primal MC (n codes)", "primal MC (16k codes)",
              "primal critic", "W_c exact", "bracket [lower, upper]", "dual cert / W_c", "primal MC / W_c",
              f"W_c ({NUM_LARGE} pts)", "W_c(X, X') floor", f"dual cert / W_c ({NUM_LARGE})",
              f"primal MC 16k / W_c ({NUM_LARGE})"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}", pm(r["dual_cert"], r["dual_cert_sd"]),
        pm(r["dual_raw"], r["dual_raw_sd"]), pm(r["primal_mc"], r["primal_mc_sd"]),
        pm(r["primal_mc_more"], r["primal_mc_more_sd"]), pm(r["primal_critic"], r["primal_critic_sd"]),
        pm(r["w_exact"], r["w_exact_sd"]), f"[{r['w_lower']:.3f}, {r['w_upper']:.3f}]",
        pm(r["dual_cert_over_w"], r["dual_cert_over_w_sd"], ".2f"), pm(r["primal_mc_over_w"], r["primal_mc_over_w_sd"], ".2f"),
        pm(r["w_large"], r["w_large_sd"]), pm(r["w_floor"], r["w_floor_sd"]),
        pm(r["dual_cert_over_w_large"], r["dual_cert_over_w_large_sd"], ".2f"),
        pm(r["primal_mc_more_over_w_large"], r["primal_mc_more_over_w_large_sd"], ".2f"),
    ] for r in rows])


def diagnostics_table(rows: list[dict]) -> str:
    header = ["data", "f", "lambda", "dual raw before refinement", "primal MC (n) before", "primal MC (16k) before",
              "recon before", "sigma before", "refined E kept (step)", "Lip bound", "median |grad h|", "recon",
              "D_f MC (n)", "D_f MC (16k)", "D_f critic", "encoder sigma (median)", "SE primal MC", "SE dual raw"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}", pm(r["dual_raw_running"], r["dual_raw_running_sd"]),
        pm(r["primal_mc_running"], r["primal_mc_running_sd"]),
        pm(r["primal_mc_more_running"], r["primal_mc_more_running_sd"]),
        pm(r["recon_running"], r["recon_running_sd"]), pm(r["encoder_sigma_median_running"], math.nan),
        pm(r["encoder_best_step"], math.nan, ".0f"),
        pm(r["lipschitz_bound"], math.nan), pm(r["critic_slope_median"], math.nan), pm(r["recon"], r["recon_sd"]),
        pm(r["divergence_mc"], r["divergence_mc_sd"]), pm(r["divergence_mc_more"], r["divergence_mc_more_sd"]),
        pm(r["divergence_critic"], r["divergence_critic_sd"]), pm(r["encoder_sigma_median"], math.nan),
        pm(r["primal_mc_se"], math.nan), pm(r["dual_raw_se"], math.nan),
    ] for r in rows])


def checks_table(rows: list[dict]) -> str:
    names = [name for name, _, _ in INEQUALITIES]
    header = ["data", "f", "lambda", *names, "(primal MC - dual raw) / SE"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}",
        *[f"{r[f'held[{n}]']} ({r[f'margin[{n}]']:+.3g})" if r[f"held[{n}]"] != "-" else "-" for n in names],
        f"{r['z[primal_MC-dual_raw]']:+.1f}",
    ] for r in rows])


def lambda_trend(rows: list[dict]) -> str:
    """Per (dataset, f): dual cert / W_c and primal / W_c from the smallest to the largest lambda."""
    lines = []
    for dataset, divergence in sorted({(r["dataset"], r["divergence"]) for r in rows}):
        rs = sorted((r for r in rows if r["dataset"] == dataset and r["divergence"] == divergence),
                    key=lambda r: r["lambda"])
        dual = " -> ".join(f"{r['dual_cert_over_w']:.2f}" for r in rs)
        primal = " -> ".join(f"{r['primal_mc_over_w']:.3g}" for r in rs)
        critic = " -> ".join(f"{r['primal_critic_over_w']:.2f}" for r in rs)
        before = " -> ".join(f"{r['primal_mc_running_over_w']:.3g}" for r in rs)
        lams = ", ".join(f"{r['lambda']:g}" for r in rs)
        line = (f"{dataset} {divergence} (lambda {lams}): dual cert / W_c {dual}; primal MC / W_c {primal} "
                f"(before the encoder refinement {before}); primal critic / W_c {critic}")
        if all(math.isfinite(r["w_large"]) for r in rs):
            dual_large = " -> ".join(f"{r['dual_cert_over_w_large']:.2f}" for r in rs)
            primal_large = " -> ".join(f"{r['primal_mc_more_over_w_large']:.3g}" for r in rs)
            line += f"; against W_c ({NUM_LARGE} pts): dual cert {dual_large}, primal MC 16k {primal_large}"
        lines.append(line)
    return "\n".join(lines)


def generator_rows(results: list[dict]) -> list[dict]:
    """W_c to held-out data per (dataset, model), mean over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["kind"] == "sinkhorn":
            label = "SinkhornGenerator (entropic OT, c = l2)"
        elif r["divergence"] == r["compare_divergence"] and r["lambda"] == r["compare_lambda"]:
            label = {1.0: "PrimalDual alpha=1 (f-WAE)", 0.0: "PrimalDual alpha=0 (Lipschitz f-GAN)"}.get(
                r["alpha"], f"PrimalDual alpha={r['alpha']:g} (hybrid)")
        else:
            continue
        groups.setdefault((r["dataset"], label), []).append(r)
    rows = []
    for (dataset, label), rs in sorted(groups.items()):
        row = {"dataset": dataset, "model": label, "seeds": len(rs), "batches": rs[0]["batches"]}
        for key in ("w_exact", "w_lower", "w_upper"):
            row[key], row[key + "_sd"] = spread([r["final"][key] for r in rs])
        rows.append(row)
    return rows


def generators_table(rows: list[dict]) -> str:
    header = ["data", "model", "W_c exact (held-out vs samples)", "certified upper", "certified lower", "seeds"]
    return common.markdown_table(header, [
        [r["dataset"], r["model"], pm(r["w_exact"], r["w_exact_sd"]), pm(r["w_upper"], r["w_upper_sd"]),
         pm(r["w_lower"], r["w_lower_sd"]), r["seeds"]] for r in rows])


# ---- plots --------------------------------------------------------------------------------------------


def plot_curves(results: list[dict], dataset: str, path: str) -> None:
    """One panel per (divergence, lambda): the chain over training (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["grid"] and r["dataset"] == dataset and r["history"] and r["seed"] == r["first_seed"]]
    divergences = sorted({r["divergence"] for r in runs})
    lambdas = sorted({r["lambda"] for r in runs})
    if not runs:
        return
    fig, axes = plt.subplots(len(divergences), len(lambdas), figsize=(3.6 * len(lambdas), 3.0 * len(divergences)),
                             squeeze=False)
    for r in runs:
        ax = axes[divergences.index(r["divergence"])][lambdas.index(r["lambda"])]
        h = r["history"]
        epochs = [row["epoch"] for row in h]
        ax.fill_between(epochs, [row["w_lower"] for row in h], [row["w_upper"] for row in h], color="0.8",
                        label="bracket [lower, upper]")
        ax.plot(epochs, [row["w_exact"] for row in h], "k-", label="W_c exact")
        ax.plot(epochs, [row["primal_mc"] for row in h], "C0-o", ms=3, label="primal (MC)")
        ax.plot(epochs, [row["primal_critic"] for row in h], "C0--", label="primal (critic)")
        ax.plot(epochs, [row["dual_raw"] for row in h], "C3-o", ms=3, label="dual (raw)")
        ax.plot(epochs, [row["dual_cert"] for row in h], "C3--", label="dual (certified)")
        final, last = r["final"], epochs[-1] + 0.25
        ax.plot([last], [final["dual_raw"]], "C3*", ms=8, label="dual (raw) after critic refinement")
        ax.plot([last], [final["dual_cert"]], "C1*", ms=6, label="dual (cert.) after critic refinement")
        top = max(max(row["w_upper"] for row in h), max(row["dual_raw"] for row in h), final["dual_raw"])
        ax.set_ylim(min(0.0, min(row["dual_cert"] for row in h)), 2.0 * top)  # a huge primal would hide the rest
        ax.set_title(f"{dataset}, {r['divergence']}, lambda={r['lambda']:g}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat:
        if not ax.has_data():
            ax.axis("off")
    next(ax for ax in axes.flat if ax.has_data()).legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lambda(rows: list[dict], path: str) -> None:
    """dual / W_c and primal / W_c against lambda, per dataset and divergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.0), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for k, divergence in enumerate(sorted({r["divergence"] for r in rows if r["dataset"] == dataset})):
            rs = sorted((r for r in rows if r["dataset"] == dataset and r["divergence"] == divergence),
                        key=lambda r: r["lambda"])
            lams = [r["lambda"] for r in rs]
            ax.errorbar(lams, [r["dual_cert_over_w"] for r in rs], yerr=[r["dual_cert_over_w_sd"] for r in rs],
                        color=f"C{k}", marker="o", linestyle="-", label=f"{divergence}: dual (cert) / W_c")
            ax.errorbar(lams, [r["primal_mc_over_w"] for r in rs], yerr=[r["primal_mc_over_w_sd"] for r in rs],
                        color=f"C{k}", marker="s", linestyle="--", label=f"{divergence}: primal (MC) / W_c")
            ax.errorbar(lams, [r["primal_critic_over_w"] for r in rs], yerr=[r["primal_critic_over_w_sd"] for r in rs],
                        color=f"C{k}", marker="^", linestyle=":", label=f"{divergence}: primal (critic) / W_c")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.01, 100.0)  # the Monte Carlo primal can be astronomically large: clipped
        ax.set_xlabel("lambda")
        ax.set_title(f"{dataset}: the chain relative to W_c(held-out, samples)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------------


def make_jobs(args: argparse.Namespace, plan: dict) -> list[dict]:
    jobs = []
    for dataset in args.datasets:
        model_args, _, _ = load_settings(dataset)
        config_alpha = float(model_args["alpha"])
        base = dict(dataset=dataset, epochs=args.epochs or plan["epochs"][dataset],
                    train_batches=plan["train_batches"][dataset], centre=True,
                    config_alpha=config_alpha, compare_divergence=args.compare_divergence,
                    compare_lambda=args.compare_lambda, first_seed=args.seeds[0], ring_std=args.ring_std,
                    generator=args.generator, critic_activation=args.critic_activation,
                    training_estimator=args.training_estimator,
                    refine_steps=plan["refine_steps"] if args.refine_steps is None
                    else args.refine_steps,
                    encoder_steps=plan.get("encoder_steps", {}).get(dataset, 0) if args.encoder_steps is None
                    else args.encoder_steps,
                    encoder_batch=args.encoder_batch)
        base["eval_every"] = min(args.eval_every or plan["eval_every"], base["epochs"])
        for seed in args.seeds:
            for divergence in args.divergences:
                for lam in args.lambdas:
                    jobs.append({**base, "kind": "primal_dual", "divergence": divergence, "lambda": lam,
                                 "alpha": config_alpha, "seed": seed, "injectivity": True, "grid": True})
            if not args.no_generators:
                alphas = [1.0, 0.0] + ([] if args.compare_divergence in args.divergences
                                       and args.compare_lambda in args.lambdas else [config_alpha])
                for alpha in alphas:
                    jobs.append({**base, "kind": "primal_dual", "divergence": args.compare_divergence,
                                 "lambda": args.compare_lambda, "alpha": alpha, "seed": seed, "injectivity": False,
                                 "grid": False, "encoder_steps": 0})  # only W_c is reported: G is what counts
                if sinkhorn_generator_available():
                    jobs.append({**base, "kind": "sinkhorn", "divergence": None, "lambda": None, "alpha": None,
                                 "seed": seed, "grid": False})
    return jobs


def sinkhorn_generator_available() -> bool:
    return os.path.exists(os.path.join(common.ROOT, "lightning_modules", "sinkhorn_generator.py"))


def describe(r: dict) -> str:
    if r["kind"] == "sinkhorn":
        return f"{r['dataset']:<10}SinkhornGenerator seed {r['seed']}"
    return (f"{r['dataset']:<10}{r['divergence']:<15}lambda {r['lambda']:<6g}alpha {r['alpha']:<4g}seed {r['seed']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, short runs (a few minutes on 2 quiet cores)")
    parser.add_argument("--datasets", nargs="+", default=["gaussians", "digits"], choices=sorted(CONFIGS))
    parser.add_argument("--divergences", nargs="+", help="registry rows (default kl jensen_shannon pearson)")
    parser.add_argument("--lambdas", type=float, nargs="+", help="lambda values (default 0.1 1 10 100)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: quick 8 / 10, full the configs')")
    parser.add_argument("--eval_every", type=int, help="epochs between evaluations of the chain (quick 3, full 5)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes, one core each")
    parser.add_argument("--no-generators", dest="no_generators", action="store_true",
                        help="skip the alpha = 1 / alpha = 0 / SinkhornGenerator comparison")
    parser.add_argument("--compare_divergence", default="kl", help="f of the alpha comparison (default kl)")
    parser.add_argument("--compare_lambda", type=float, default=10.0, help="lambda of the alpha comparison")
    parser.add_argument("--ring_std", type=float, default=RING_STD, help="std of each Gaussian of the 2-D ring")
    parser.add_argument("--generator", choices=["injective", "mlp"], default="injective",
                        help="2-D generator: InjectiveGenerator (injective by construction) or the config's MLP")
    parser.add_argument("--refine_steps", type=int, help="critic-only steps against the frozen final G (quick 300, "
                        "full 2000; 0: none)")
    parser.add_argument("--encoder_steps", type=int, help="encoder-only steps against the frozen final G, with "
                        "continuation in lambda (quick 2000 / 1000 for gaussians / digits, full 6000 / 4000; 0: none)")
    parser.add_argument("--encoder_batch", type=int, default=1000, help="training points per encoder refinement step")
    parser.add_argument("--critic_activation", choices=["leaky_relu", "maxmin"],
                        help="data critic activation (default: the configs'); maxmin writes primal_dual_chain_maxmin*")
    parser.add_argument("--training_estimator", choices=["critic", "monte_carlo"], default="critic",
                        help="D_f estimate the encoders descend (PrimalDual's training_estimator); monte_carlo "
                        "(no latent adversary) writes primal_dual_chain*_mc*")
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument("--replot", metavar="JSON", help="no training: rebuild the tables, files and plots from a "
                        "JSON this script wrote")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    args.divergences = args.divergences or plan["divergences"]
    args.lambdas = args.lambdas or plan["lambdas"]
    args.seeds = args.seeds or plan["seeds"]
    args.command = common.command_line()
    if args.replot:
        payload = common.read_json(args.replot)
        if payload is None or "runs" not in payload:
            raise FileNotFoundError(f"--replot needs a JSON written by this script (with its 'runs'), got {args.replot!r}.")
        results, machine, elapsed = payload["runs"], payload["machine"], payload["wall_seconds"]
        for key in ("quick", "datasets", "divergences", "lambdas", "seeds", "compare_divergence", "compare_lambda",
                    "critic_activation", "training_estimator"):
            setattr(args, key, payload["settings"].get(key, getattr(args, key)))
        plan, args.command = payload["settings"]["plan"], payload["command"]
    else:
        results, machine, elapsed = run_all(args, plan)
    write_outputs(results, args, plan, machine, elapsed)


def run_all(args: argparse.Namespace, plan: dict) -> tuple[list[dict], dict, float]:
    """Train and evaluate every job (in `args.workers` processes); returns (results, machine, seconds)."""
    torch.set_num_threads(1)
    quiet()
    machine = common.machine_info()
    jobs = make_jobs(args, plan)
    print(f"{len(jobs)} runs on {args.workers} worker(s): datasets {args.datasets}, divergences {args.divergences}, "
          f"lambdas {args.lambdas}, seeds {args.seeds}; cost c = {COST}",
          flush=True)
    if not sinkhorn_generator_available():
        print("lightning_modules/sinkhorn_generator.py is missing: no SinkhornGenerator row.", flush=True)
    start = time.time()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        for job, r in zip(jobs, pool.map(train_one, jobs)):
            r.update({k: job[k] for k in ("config_alpha", "compare_divergence", "compare_lambda", "first_seed", "grid")})
            results.append(r)
            f = r["final"]
            extra = "" if r["kind"] == "sinkhorn" else (
                f"dual cert {f['dual_cert']:.3f} raw {f['dual_raw']:.3f} primal MC {f['primal_mc']:.3f} "
                f"critic {f['primal_critic']:.3f} ")
            print(f"[{len(results)}/{len(jobs)}] {describe(r)}: {extra}W_c {f['w_exact']:.3f} "
                  f"[{f['w_lower']:.3f}, {f['w_upper']:.3f}] ({r['seconds']:.0f} s)", flush=True)
    elapsed = time.time() - start
    return results, machine, elapsed


def write_outputs(results: list[dict], args: argparse.Namespace, plan: dict, machine: dict, elapsed: float) -> None:
    """Print the tables, write the files, and raise if a certified inequality failed."""
    # ---- the certified inequalities: any violation is a bug ----
    violations = []
    evaluations = 0
    for r in results:
        for row in r["history"] + [r["final"]]:  # every evaluation during training, and the final one
            evaluations += 1
            where = f"{describe(r)} epoch {row.get('epoch', 'final')}"
            if "theorem_ok" in row and not row["theorem_ok"]:
                violations.append(f"{where}: dual_cert {row['dual_cert']!r} > W_c {row['w_exact']!r}")
            if not row["bracket_ok"]:
                violations.append(f"{where}: W_c {row['w_exact']!r} outside the bracket "
                                  f"[{row['w_lower']!r}, {row['w_upper']!r}]")

    rows = summarize(results)
    gen_rows = generator_rows(results)
    ceiling = ceiling_table(args.lambdas, args.divergences)
    report: list[str] = [f"# {NAME}{' (quick)' if args.quick else ''}: {args.command}"]

    def say(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    say(f"\n## The chain on held-out data (c = {COST}; mean ± sd over seeds {args.seeds}; final evaluation)")
    say("dual raw / cert: the trained critic's value on (X, Y), raw and divided by max(1, certified Lipschitz "
          "bound); primal MC: recon + lambda * critic-free Monte Carlo D_f of the held-out codes' mixture; primal "
          "critic: recon + lambda * the latent critic's estimate; W_c exact: POT on the same (X, Y); bracket: "
          "certified Sinkhorn bounds on it.\n")
    say(chain_table(rows))
    say("\n## Diagnostics (mean over seeds)\n")
    say(diagnostics_table(rows))
    say("\n## Which inequalities held: seeds where it held / seeds (mean margin = larger side - smaller side)\n")
    say(checks_table(rows))
    say("\n## lambda trend\n")
    say(lambda_trend(rows))
    say(f"\nCertified checks over {evaluations} evaluations (every eval_every epochs, the final one after the "
          "critic and encoder refinements, and the generator comparison): "
          + ("dual_cert <= W_c(X, Y) and lower <= W_c <= upper held at EVERY evaluation."
             if not violations else f"{len(violations)} VIOLATIONS (bugs): see below."))
    say("\n## The model's critic class on a Gaussian shift (W_1 = 2; v linear, 1-Lipschitz; quadrature, no "
          "training): best value / W_1\n")
    lam_cols = sorted({c["lambda"] for c in ceiling})
    say(common.markdown_table(["f", *[f"lambda={lam:g}" for lam in lam_cols]], [
        [name, *[f"{next(c['value_over_w'] for c in ceiling if c['divergence'] == name and c['lambda'] == lam):.3f}"
                 for lam in lam_cols]] for name in args.divergences]))
    if not sinkhorn_generator_available():
        say("\nlightning_modules/sinkhorn_generator.py is missing: no SinkhornGenerator row in the comparison.")
    if gen_rows:
        say(f"\n## W_c to held-out data reached, same generator network and budget (PrimalDual with "
              f"{args.compare_divergence}, lambda {args.compare_lambda:g})\n")
        say(generators_table(gen_rows))
    inj = [r for r in results if "injectivity" in r]
    if inj:
        say("\n## Generator injectivity checks (final generators)\n")
        for dataset in args.datasets:
            rs = [r["injectivity"] for r in inj if r["dataset"] == dataset]
            if rs and "det_same_sign" in rs[0]:
                same = sum(x["det_same_sign"] for x in rs)
                say(f"{dataset}: det dG/dz of one sign at all 20,000 prior draws in {same}/{len(rs)} generators; "
                      f"smallest |det| {min(x['det_abs_min'] for x in rs):.2e}, median "
                      f"{statistics.median(x['det_abs_median'] for x in rs):.2e}")
            elif rs:
                say(f"{dataset}: smallest singular value of dG/dz over 1,000 draws per generator: min "
                      f"{min(x['min_singular_value'] for x in rs):.2e}, median of minima "
                      f"{statistics.median(x['min_singular_value'] for x in rs):.2e}")
    say(f"\n({elapsed:.0f} s wall clock; {sum(r['seconds'] for r in results):.0f} s of training in all; the CPU may "
          "be shared: timings are not results.)")

    # ---- files ----
    suffix = "_maxmin" if getattr(args, "critic_activation", None) == "maxmin" else ""
    suffix += "_mc" if getattr(args, "training_estimator", "critic") == "monte_carlo" else ""
    stem = common.result_stem(NAME + suffix, args.quick, args.out)
    flat = [{**{k: r[k] for k in ("dataset", "kind", "divergence", "lambda", "alpha", "seed", "epochs", "batches",
                                  "centre", "critic_centre", "seconds")}, **r["final"], **r.get("injectivity", {})}
            for r in results]
    common.write_csv(stem + ".csv", flat)
    common.write_csv(stem + "_summary.csv", rows)
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(report) + "\n")
    common.write_csv(stem + "_history.csv", [
        {**{k: r[k] for k in ("dataset", "divergence", "lambda", "alpha", "seed")}, **row}
        for r in results for row in r["history"]])
    if gen_rows:
        common.write_csv(stem + "_generators.csv", gen_rows)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("replot", "command")}, "plan": plan, "cost": COST, "eval_seed": EVAL_SEED,
                "bracket_tol": BRACKET_TOL, "mc_samples": MC_SAMPLES, "configs": CONFIGS}
    payload = common.result_payload(NAME, args.quick, settings, flat, {
        "chain": rows, "generators": gen_rows, "ceiling": ceiling, "violations": violations}, machine, elapsed)
    payload["command"] = args.command  # the training command, also when --replot rebuilt these files
    payload["runs"] = results  # everything, with the curves: --replot rebuilds the tables and plots from it
    common.write_json(stem + ".json", payload)
    for dataset in args.datasets:
        plot_curves(results, dataset, f"{stem}_{dataset}.png")
    plot_lambda(rows, stem + "_lambda.png")
    print(f"wrote {stem}.md (these tables), .csv, _summary.csv, _history.csv, _generators.csv, .json and the PNG plots")

    if violations:
        banner = "!" * 100
        print(f"\n{banner}\nBUG: a certified inequality failed ({len(violations)} times). dual_cert <= W_c(X, Y) is a "
              f"theorem for a critic in H_c on the same samples, and the bracket is certified:\n"
              + "\n".join(violations[:20]) + f"\n{banner}", flush=True)
        raise AssertionError(f"{len(violations)} certified inequalities failed; see above")


if __name__ == "__main__":
    main()
