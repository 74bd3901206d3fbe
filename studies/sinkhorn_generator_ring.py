"""A generator trained by entropic optimal transport on the ring of 8 Gaussians: mode coverage, and
the certified upper bound on W_c to held-out data, trained vs untrained.

The ring (radius 2, std 0.02, `GaussianMixtureDataModule` defaults) is the classic mode-collapse
test. `SinkhornGenerator` (docs/theory.md 3.5) is trained with the
settings of configs/sinkhorn_gaussians.yaml (read from the file) and, with `--variants`, with
other objectives and costs. After training:

- modes: 2500 samples (seeded) counted by `callbacks.modes.mode_coverage`: a mode is covered when
  >= 2% of the samples lie within 3 std of its centre;
- W bound: `transport.wasserstein_bracket` (docs/theory.md 5) between the datamodule's TEST split (1000
  points never used in training) and 1000 samples (seeded), in the model's cost: lower <= W_c <=
  upper, certified; the same for the untrained generator (a copy of the model taken before
  training: same architecture, same initial weights). ratio = untrained upper / trained upper.
  POT's exact W_c between the same points is reported beside it when POT is installed.
- floor: POT's exact W_c between the test split and the validation split (1000 points each of the
  true ring): what a perfect generator would score on 1000 samples, so about the largest ratio
  possible. (Exact, not the bracket: between two sets of tight clusters the bracket needs a tiny
  eps and minutes, where the network simplex takes a fraction of a second.)

    python -m studies.sinkhorn_generator_ring --quick         # 1 seed, 10 epochs (400 steps)
    python -m studies.sinkhorn_generator_ring                 # seeds 0 1 2, the config's epochs
    python -m studies.sinkhorn_generator_ring --variants entropic:l2 entropic:l2sq sinkhorn_divergence:l2

Writes studies/results/sinkhorn_generator_ring[_quick].csv and .json (one row per run) and .png
(held-out data and samples of every run, trained and untrained); docs/STUDIES.md reads them.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

from benchmarks import common
from studies.common import RESULTS, add_seed_arguments, draw_ring_panel, seeds_and_epochs

CONFIG = common.config_path("sinkhorn_gaussians")
NUM_MODE_SAMPLES = 2500
NUM_BOUND_SAMPLES = 1000
TARGET_RATIO = 5.0
QUICK_EPOCHS = 10


def bracket_row(real, fake, cost: str, seconds: float | None) -> dict:
    """Certified bracket (and POT's exact value when available) between two sample sets."""
    from transport import wasserstein_bracket

    bracket = wasserstein_bracket(real, fake, cost=cost, tol=0.01, max_seconds=seconds)
    row = {"lower": bracket.lower, "upper": bracket.upper, "relative_width": bracket.relative_width,
           "converged": bracket.converged, "seconds": bracket.seconds, "exact": None}
    try:
        from transport import exact_wasserstein

        row["exact"] = exact_wasserstein(real, fake, cost)
    except ModuleNotFoundError:
        pass
    return row


def data_floor(data_args: dict, cost: str) -> float | None:
    """Exact W_c between two independent samples of the ring (validation and test splits), or
    None without POT."""
    import torch

    from datamodules import GaussianMixtureDataModule
    from transport import exact_wasserstein

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
    """Train one SinkhornGenerator (objective, cost, seed) and score it and its untrained copy."""
    import lightning as L
    import torch

    from callbacks.modes import mode_coverage
    from datamodules import GaussianMixtureDataModule
    from lightning_modules.sinkhorn_generator import SinkhornGenerator

    common.quiet_worker(1)  # problems this small run faster on one thread
    L.seed_everything(seed, verbose=False)
    datamodule = GaussianMixtureDataModule(**data_args)  # the same data for every seed
    model = SinkhornGenerator(data_shape=datamodule.dims, **{**model_args, "objective": objective, "cost": cost})
    untrained = copy.deepcopy(model)  # same architecture, same initial weights
    trainer = common.bare_trainer(max_epochs=epochs, limit_val_batches=0)
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
    """Held-out data and samples of every run, trained and untrained, one row of panels per run."""
    plt = common.pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(7, 3.4 * len(rows)), squeeze=False)
    for r, (ax_trained, ax_untrained) in zip(rows, axes):
        for ax, name in ((ax_trained, "trained"), (ax_untrained, "untrained")):
            draw_ring_panel(ax, [(r["held_out"], "held-out data"), (r["samples"][name], "samples")], r["centers"],
                            f"{name}: {r['objective']}, {r['cost']}, seed {r['seed']}\n{r[f'{name}_modes']}/8 "
                            f"modes, W upper {r[f'{name}_w_upper']:.3f}")
        ax_trained.legend(loc="lower left", fontsize=6)
    common.save_figure(fig, path, dpi=80)


def print_table(rows: list[dict], floors: dict[str, float | None], elapsed: float) -> None:
    """One line per run (modes, W bounds trained and untrained, their ratio), and the data floors."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(parser, QUICK_EPOCHS, " (400 steps)")
    parser.add_argument("--variants", nargs="+", help="objective:cost pairs (default: the config's)")
    parser.add_argument("--bracket_seconds", type=float, default=None,
                        help="time budget of each bracket (default: none, so the bounds do not depend on the load)")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    model_args, data_args, config_epochs = common.config_parts(args.config)
    seeds, epochs = seeds_and_epochs(args, QUICK_EPOCHS, config_epochs)
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
    print_table(rows, floors, elapsed)

    stem = common.result_stem("sinkhorn_generator_ring", args.quick, args.out)
    table = [{k: v for k, v in r.items() if k not in ("samples", "held_out", "centers")} for r in rows]
    common.write_csv(stem + ".csv", table)
    common.write_json(stem + ".json", {
        "config": os.path.relpath(args.config, common.ROOT), "model": model_args, "data": data_args, "epochs": epochs,
        "seeds": seeds, "runs": table, "floor": floors, "wall_seconds": elapsed})
    plot(rows, stem + ".png")
    print(f"wrote {stem}.csv, {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
