"""A generator trained by entropic optimal transport on the ring of 8 Gaussians: mode coverage, and
the certified upper bound on W_c to held-out data, trained vs untrained.

The ring (radius 2, std 0.02, `GaussianMixtureDataModule` defaults) is the classic mode-collapse
test (SPEC 7). `SinkhornGenerator` (lightning_modules/sinkhorn_generator.py) is trained with the
settings of configs/sinkhorn_gaussians.yaml (read from the file) and, with `--variants`, with
other objectives and costs. After training:

- modes: 2500 samples (seeded) counted by `callbacks.modes.mode_coverage`: a mode is covered when
  >= 2% of the samples lie within 3 std of its centre;
- W bound: `callbacks.sinkhorn.wasserstein_bracket` between the datamodule's TEST split (1000
  points never used in training) and 1000 samples (seeded), in the model's cost: lower <= W_c <=
  upper, certified; the same for the untrained generator (a copy of the model taken before
  training: same architecture, same initial weights). ratio = untrained upper / trained upper.
  POT's exact W_c between the same points is reported beside it when POT is installed.
- floor: POT's exact W_c between the test split and the validation split (1000 points each of the
  true ring): what a perfect generator would score on 1000 samples, so about the largest ratio
  possible. (Exact, not the bracket: between two sets of tight clusters the bracket needs a tiny
  eps, 150-180 s measured on the loaded 2-core machine, against 0.1 s for the network simplex.)

    python benchmarks/sinkhorn_generator_ring.py --quick         # 1 seed, 10 epochs (400 steps)
    python benchmarks/sinkhorn_generator_ring.py                 # seeds 0 1 2, the config's epochs
    python benchmarks/sinkhorn_generator_ring.py --variants entropic:l2 entropic:l2sq sinkhorn_divergence:l2

Writes benchmarks/results/sinkhorn_generator_ring[_quick].csv and .json (one row per run) and .png
(held-out data and samples of every run, trained and untrained).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sinkhorn_gaussians.yaml")
NUM_MODE_SAMPLES = 2500
NUM_BOUND_SAMPLES = 1000
TARGET_RATIO = 5.0


def load_settings(path: str) -> tuple[dict, dict, int]:
    """(model init_args, data init_args, max_epochs) of a train.py config."""
    with open(path) as handle:
        config = yaml.safe_load(handle)
    return dict(config["model"]["init_args"]), dict(config["data"]["init_args"]), int(config["trainer"]["max_epochs"])


def bracket_row(real, fake, cost: str, seconds: float | None) -> dict:
    """Certified bracket (and POT's exact value when available) between two sample sets."""
    from callbacks.sinkhorn import wasserstein_bracket

    bracket = wasserstein_bracket(real, fake, cost=cost, tol=0.01, max_seconds=seconds)
    row = {"lower": bracket.lower, "upper": bracket.upper, "relative_width": bracket.relative_width,
           "converged": bracket.converged, "seconds": bracket.seconds, "exact": None}
    try:
        from callbacks.sinkhorn import exact_wasserstein

        row["exact"] = exact_wasserstein(real, fake, cost)
    except ModuleNotFoundError:
        pass
    return row


def data_floor(data_args: dict, cost: str) -> float | None:
    """Exact W_c between two independent samples of the ring (validation and test splits), or
    None without POT."""
    import torch

    from callbacks.sinkhorn import exact_wasserstein
    from datamodules import GaussianMixtureDataModule

    datamodule = GaussianMixtureDataModule(**data_args)
    datamodule.setup("fit")
    datamodule.setup("test")
    val = torch.cat([x for x, _ in datamodule.val_dataloader()])[:NUM_BOUND_SAMPLES]
    test = torch.cat([x for x, _ in datamodule.test_dataloader()])[:NUM_BOUND_SAMPLES]
    try:
        return exact_wasserstein(test, val, cost)
    except ModuleNotFoundError:
        return None


def train_one(objective: str, cost: str, seed: int, epochs: int, model_args: dict, data_args: dict,
              bracket_seconds: float | None) -> dict:
    import logging
    import warnings

    import lightning as L
    import torch

    from callbacks.modes import mode_coverage
    from datamodules import GaussianMixtureDataModule
    from lightning_modules.sinkhorn_generator import SinkhornGenerator

    torch.set_num_threads(1)  # problems this small run faster on one thread
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(seed, verbose=False)
    datamodule = GaussianMixtureDataModule(**data_args)  # the same data for every seed
    model = SinkhornGenerator(data_shape=datamodule.dims, **{**model_args, "objective": objective, "cost": cost})
    untrained = copy.deepcopy(model)  # same architecture, same initial weights
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.time()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.time() - start
    datamodule.setup("test")
    held_out = torch.cat([x for x, _ in datamodule.test_dataloader()])[:NUM_BOUND_SAMPLES]  # (1000, 2)
    row = {"objective": objective, "cost": cost, "seed": seed, "epochs": epochs,
           "steps": trainer.fit_loop.epoch_loop.batch_progress.total.completed, "train_seconds": seconds}
    samples = {}
    for name, m in (("trained", model), ("untrained", untrained)):
        modes = mode_coverage(m.sample(NUM_MODE_SAMPLES, generator=torch.Generator().manual_seed(10_000 + seed)),
                              datamodule.centers, datamodule.std)
        fake = m.sample(NUM_BOUND_SAMPLES, generator=torch.Generator().manual_seed(20_000 + seed))  # (1000, 2)
        bound = bracket_row(held_out, fake, cost, bracket_seconds)
        row.update({f"{name}_modes": modes.num_covered, f"{name}_high_quality": modes.high_quality_fraction,
                    **{f"{name}_w_{k}": v for k, v in bound.items()}})
        samples[name] = fake.tolist()
    row["ratio"] = row["untrained_w_upper"] / row["trained_w_upper"]
    row["samples"] = samples
    row["held_out"] = held_out.tolist()
    row["centers"] = datamodule.centers.tolist()
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(7, 3.4 * len(rows)), squeeze=False)
    for r, (ax_trained, ax_untrained) in zip(rows, axes):
        for ax, name in ((ax_trained, "trained"), (ax_untrained, "untrained")):
            common.draw_ring_panel(ax, [(r["held_out"], "held-out data"), (r["samples"][name], "samples")], r["centers"],
                                   f"{name}: {r['objective']}, {r['cost']}, seed {r['seed']}\n{r[f'{name}_modes']}/8 "
                                   f"modes, W upper {r[f'{name}_w_upper']:.3f}")
        ax_trained.legend(loc="lower left", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and 10 epochs (400 steps)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the config's; quick: 10)")
    parser.add_argument("--variants", nargs="+", help="objective:cost pairs (default: the config's)")
    parser.add_argument("--bracket_seconds", type=float, default=None,
                        help="time budget of each bracket (default: none, so the bounds do not depend on the load)")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()

    model_args, data_args, config_epochs = load_settings(args.config)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (10 if args.quick else config_epochs)
    variants = [tuple(v.split(":")) for v in args.variants] if args.variants else [
        (model_args["objective"], model_args["cost"])]
    print(f"{len(variants) * len(seeds)} runs: {variants} x seeds {seeds}, {epochs} epochs each; settings from "
          f"{os.path.relpath(args.config)}", flush=True)
    start = time.time()
    rows = []
    for objective, cost in variants:
        for seed in seeds:
            r = train_one(objective, cost, seed, epochs, model_args, data_args, args.bracket_seconds)
            rows.append(r)
            print(f"{objective:<20}{cost:<6}seed {seed}: {r['trained_modes']}/8 modes "
                  f"(HQ {r['trained_high_quality']:.3f}), "
                  f"W upper trained {r['trained_w_upper']:.4f} vs untrained {r['untrained_w_upper']:.4f}, ratio "
                  f"{r['ratio']:.1f} ({r['steps']} steps, {r['train_seconds']:.0f} s training)", flush=True)
    floors = {cost: data_floor(data_args, cost) for cost in sorted({c for _, c in variants})}
    elapsed = time.time() - start

    print(f"\n{'objective':<20}{'cost':<6}{'seed':>5}{'modes':>7}{'HQ':>7}{'W upper':>10}{'(exact)':>10}"
          f"{'untrained':>11}{'ratio':>7}  done")
    for r in rows:
        exact = f"{r['trained_w_exact']:.4f}" if r["trained_w_exact"] is not None else "-"
        done = r["trained_modes"] == 8 and r["ratio"] >= TARGET_RATIO
        print(f"{r['objective']:<20}{r['cost']:<6}{r['seed']:>5}{r['trained_modes']:>7}"
              f"{r['trained_high_quality']:>7.3f}"
              f"{r['trained_w_upper']:>10.4f}{exact:>10}{r['untrained_w_upper']:>11.4f}{r['ratio']:>7.1f}  "
              f"{'yes' if done else 'no'}")
    print(f"(done: 8/8 modes and ratio >= {TARGET_RATIO:g}; W in the run's cost, {NUM_BOUND_SAMPLES} test points vs "
          f"{NUM_BOUND_SAMPLES} samples; {elapsed:.0f} s wall clock in all)")
    for cost, floor in floors.items():
        if floor is not None:
            print(f"floor ({cost}): exact W between the test and validation splits of the ring itself {floor:.4f}")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "sinkhorn_generator_ring" + ("_quick" if args.quick else ""))
    table = [{k: v for k, v in r.items() if k not in ("samples", "held_out", "centers")} for r in rows]
    with open(stem + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    with open(stem + ".json", "w") as handle:
        json.dump({"config": os.path.relpath(args.config, ROOT), "model": model_args, "data": data_args,
                   "epochs": epochs, "seeds": seeds, "runs": table, "floor": floors, "wall_seconds": elapsed},
                  handle, indent=2)
    plot(rows, stem + ".png")
    print(f"wrote {stem}.csv, {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
