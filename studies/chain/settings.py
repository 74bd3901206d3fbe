"""What the chain study runs: its plans (quick, full), the constants of its evaluation, the configs
it starts from, and its data."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import common

NAME = "primal_dual_chain"
COST = "l2"  # a metric: the chain dual <= primal <= W_c needs one (docs/theory.md 4.1)
CONFIGS = {"gaussians": "primal_dual_gaussians", "digits": "primal_dual_digits"}
EVAL_SEED = 12_345  # latent codes of the generated evaluation samples: the same at every evaluation
BRACKET_TOL = 0.01
BRACKET_SECONDS = 30.0
MC_SAMPLES = 8192
# The 2-D ring's std. The config's 0.02 makes 8 near-atoms that an injective map from N(0, I_2)
# must stretch 50-fold; at 0.1 neighbouring modes are still 15 std apart.
RING_STD = 0.1
NUM_MORE = 16_000  # 2-D data: fresh points whose codes' mixture gives the less biased Monte Carlo D_f
NUM_LARGE = 4096  # 2-D data: W_c between this many fresh data and model points (exact, by POT)
THEOREM_SLACK = 1e-9  # tolerance of the asserted (certified) inequalities: float64 rounding only

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


def load_settings(dataset: str) -> tuple[dict, dict]:
    """(model init_args, data init_args) of the dataset's train.py config."""
    model_args, data_args, _ = common.config_parts(CONFIGS[dataset])
    return model_args, data_args


def make_datamodule(dataset: str, data_args: dict, ring_std: float | None = None) -> Any:
    """The dataset's datamodule with seed 0 (the same data for every training seed); the ring with
    std `ring_std` when given."""
    from datamodules import DigitsDataModule, GaussianMixtureDataModule

    if dataset == "gaussians":
        return GaussianMixtureDataModule(**{**data_args, "seed": 0, **({"std": ring_std} if ring_std else {})})
    return DigitsDataModule(**{**data_args, "seed": 0})


def held_out(datamodule: Any) -> torch.Tensor:
    """All validation points, (n, *data_shape)."""
    datamodule.setup("fit")
    return torch.cat([batch[0] for batch in datamodule.val_dataloader()])


def fresh_points(datamodule: Any, n: int, seed: int) -> torch.Tensor:
    """n fresh points of the 2-D ring's known mixture, (n, 2), drawn with `seed`."""
    from studies.common import ring_points

    return ring_points(datamodule.centers, datamodule.std, n, seed)

# The values of the last evaluation during training (before the critic and encoder refinements),
# kept in the final row with the suffix `_running`.
RUNNING_COLUMNS = ["dual_raw", "dual_cert", "lipschitz_bound", "primal_mc", "primal_mc_more", "primal_critic", "recon",
                   "encoder_sigma_median"]
