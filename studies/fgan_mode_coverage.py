"""Mode coverage of the f-GAN on the ring of 8 Gaussians, for every divergence of the registry.

The ring (radius 2, std 0.02) is the classic mode-collapse test. Every row of the f-divergence
table (docs/theory.md 2.1) is trained with the same networks, optimiser and number of steps,
read from configs/fgan_gaussians.yaml, with an unconstrained critic; the rows whose output
activation is 1-Lipschitz (kl, pearson, jensen_shannon, gan, total_variation; docs/theory.md 2.6)
are trained a second time with the spectrally normalised critic (`lipschitz="spectral_norm"`,
docs/theory.md 4.3). After
training, 2500 samples are drawn and counted with `callbacks.modes.mode_coverage`: a mode is
covered when >= 2% of the samples lie within 3 std of its centre; the high-quality fraction is
the share of samples within 3 std of their nearest centre. Coverage is also recorded every
`--eval_every` epochs, since a GAN's coverage on this ring can change from one epoch to the next
(mode hopping), so the last epoch alone can mislead.

A configuration "collapses" when its mean number of covered modes over the seeds is below 6;
"diverged" marks a run stopped by a non-finite loss (the module's NonFiniteError; the coverage
is then that of the model when it stopped) or non-finite samples.

    python -m studies.fgan_mode_coverage --quick     # 1 seed, 40 epochs
    python -m studies.fgan_mode_coverage             # 3 seeds, the config's 60 epochs

Writes studies/results/fgan_mode_coverage[_quick].csv (one row per configuration and seed),
..._history.csv (coverage during training) and ....png (final samples of the first seed);
docs/STUDIES.md reads them.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from statistics import mean

from benchmarks import common
from studies.common import RESULTS, add_seed_arguments, draw_ring_panel, seeds_and_epochs

CONFIG = common.config_path("fgan_gaussians")
NUM_EVAL_SAMPLES = 2500
COLLAPSE_BELOW = 6  # mean covered modes under which a configuration is said to collapse
QUICK_EPOCHS = 40


def configurations(divergences: list[str] | None = None) -> list[tuple[str, str]]:
    """(divergence, lipschitz) pairs: every row (or those in `divergences`) unconstrained, the
    1-Lipschitz rows also with SN."""
    from maths.divergences import DIVERGENCE_NAMES, get_divergence

    names = [name for name in DIVERGENCE_NAMES if divergences is None or name in divergences]
    rows = [(name, "none") for name in names]
    rows += [(name, "spectral_norm") for name in names if get_divergence(name).is_activation_1_lipschitz]
    return rows


def train_one(job: dict) -> dict:
    """Train one (divergence, lipschitz, seed) and measure its coverage; runs in a worker process."""
    import lightning as L
    import torch

    from callbacks.modes import ModeCoverageCallback, mode_coverage
    from datamodules import GaussianMixtureDataModule
    from lightning_modules.fgan import FGAN

    common.quiet_worker(1)  # one core per worker, no per-run banners
    L.seed_everything(job["seed"], verbose=False)
    datamodule = GaussianMixtureDataModule(**job["data"])  # the same data for every seed
    model = FGAN(data_shape=datamodule.dims, **{**job["model"], "divergence": job["divergence"],
                                                 "lipschitz": job["lipschitz"]})
    coverage = ModeCoverageCallback(num_samples=NUM_EVAL_SAMPLES, every_n_epochs=job["eval_every"])
    history = []

    class Record(L.Callback):
        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if coverage.last is not None and not trainer.sanity_checking:
                history.append((trainer.current_epoch + 1, coverage.last.num_covered, coverage.last.high_quality_fraction))

    trainer = common.bare_trainer(max_epochs=job["epochs"], limit_val_batches=1, check_val_every_n_epoch=job["eval_every"],
                                  callbacks=[coverage, Record()])
    start = time.time()
    stopped = ""
    try:
        trainer.fit(model, datamodule=datamodule)
    except FloatingPointError as error:  # the module's NonFiniteError: a NaN / inf loss stops training
        stopped = str(error).split(". ")[0]  # "step 1234: train/critic_loss is nan (epoch 5)"
    seconds = time.time() - start
    generator = torch.Generator().manual_seed(10_000 + job["seed"])
    samples = model.sample(NUM_EVAL_SAMPLES, generator=generator)  # (2500, 2)
    result = mode_coverage(samples, datamodule.centers, datamodule.std)
    return {
        **{k: job[k] for k in ("divergence", "lipschitz", "seed", "epochs")},
        "steps": trainer.fit_loop.epoch_loop.batch_progress.total.completed,
        "modes_covered": result.num_covered,
        "high_quality_fraction": result.high_quality_fraction,
        "finite": bool(torch.isfinite(samples).all()),
        "stopped": stopped,
        "per_mode": result.counts.tolist(),
        "seconds": seconds,
        "history": history,
        "samples": samples.tolist() if job["seed"] == job["plot_seed"] else None,
        "centers": datamodule.centers.tolist(),
    }


def status(modes: list[int], finite: list[bool], stopped: list[str]) -> str:
    if not all(finite) or any(stopped):
        return "diverged"
    return "collapsed" if mean(modes) < COLLAPSE_BELOW else "covers"


def plot(results: list[dict], path: str) -> None:
    """The final samples of the first seed, one panel per configuration."""
    plt = common.pyplot()
    shown = [r for r in results if r["samples"] is not None]
    cols = 5
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        critic = "SN critic" if r["lipschitz"] == "spectral_norm" else "critic"
        draw_ring_panel(ax, [(r["samples"], None)], r["centers"],
                        f"{r['divergence']} ({critic})\n{r['modes_covered']}/8 modes, HQ {r['high_quality_fraction']:.2f}")
    common.save_figure(fig, path, dpi=80)


def summarize(results: list[dict], divergences: list[str] | None, elapsed: float) -> dict[tuple[str, str], str]:
    """Print the table per configuration (modes per seed, mean, high-quality fraction, status) and
    the verdict lines; returns the status of each (divergence, lipschitz)."""
    print(f"\n{'divergence':<16}{'critic':<15}{'modes per seed':<16}{'mean':>6}{'HQ mean':>9}  status")
    summary = {}
    for d, lip in configurations(divergences):
        rs = [r for r in results if r["divergence"] == d and r["lipschitz"] == lip]
        modes = [r["modes_covered"] for r in rs]
        summary[d, lip] = status(modes, [r["finite"] for r in rs], [r["stopped"] for r in rs])
        hq = mean(r["high_quality_fraction"] for r in rs)
        print(f"{d:<16}{lip:<15}{' '.join(map(str, modes)):<16}{mean(modes):>6.2f}{hq:>9.3f}  {summary[d, lip]}")
    steps = max(r["steps"] for r in results)
    print(f"({steps} generator steps per run unless stopped; {elapsed:.0f} s wall clock, "
          f"{sum(r['seconds'] for r in results):.0f} s of training in all)")
    collapsed = [f"{d}{' (SN)' if lip != 'none' else ''}" for (d, lip), s in summary.items() if s != "covers"]
    print(f"collapse or divergence (mean < {COLLAPSE_BELOW} modes, or non-finite): {', '.join(collapsed) or 'none'}")
    for d in ("jensen_shannon", "gan"):
        modes = [r["modes_covered"] for r in results if r["divergence"] == d and r["lipschitz"] == "none"]
        if modes:
            print(f"{d}: modes covered {modes} (target >= 6 of 8)")
    return summary


def write_files(results: list[dict], summary: dict[tuple[str, str], str], stem: str) -> None:
    """<stem>.csv (one row per run), <stem>_history.csv (coverage during training), <stem>.png."""
    common.write_csv(stem + ".csv", [
        {"divergence": r["divergence"], "lipschitz": r["lipschitz"], "seed": r["seed"], "epochs": r["epochs"],
         "steps": r["steps"], "modes_covered": r["modes_covered"],
         "high_quality_fraction": f"{r['high_quality_fraction']:.4f}", "finite": r["finite"], "stopped": r["stopped"],
         "per_mode_counts": r["per_mode"], "status": summary[r["divergence"], r["lipschitz"]],
         "seconds": f"{r['seconds']:.1f}"} for r in results])
    common.write_csv(stem + "_history.csv", [
        {"divergence": r["divergence"], "lipschitz": r["lipschitz"], "seed": r["seed"], "epoch": epoch,
         "modes_covered": modes, "high_quality_fraction": f"{hq:.4f}"}
        for r in results for epoch, modes, hq in r["history"]])
    plot(results, stem + ".png")
    print(f"wrote {stem}.csv, {stem}_history.csv and {stem}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(parser, QUICK_EPOCHS)
    parser.add_argument("--eval_every", type=int, default=10, help="epochs between coverage records")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one core each (default: up to 2)")
    parser.add_argument("--divergences", nargs="+", help="registry rows to train (default: all eight)")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    model_args, data_args, config_epochs = common.config_parts(args.config)
    seeds, epochs = seeds_and_epochs(args, QUICK_EPOCHS, config_epochs)
    jobs = [
        dict(divergence=d, lipschitz=lip, seed=s, epochs=epochs, eval_every=min(args.eval_every, epochs),
             model=model_args, data=data_args, plot_seed=seeds[0])
        for d, lip in configurations(args.divergences) for s in seeds
    ]
    print(f"{len(jobs)} runs: {len(configurations(args.divergences))} configurations x seeds {seeds}, {epochs} epochs each, "
          f"{args.workers} worker(s); settings from {os.path.relpath(args.config)}", flush=True)
    start = time.time()
    results = []
    for r in common.map_in_workers(train_one, jobs, args.workers):
        results.append(r)
        note = f"; stopped: {r['stopped']}" if r["stopped"] else ""
        print(f"[{len(results)}/{len(jobs)}] {r['divergence']:<16}{r['lipschitz']:<14}seed {r['seed']}: "
              f"{r['modes_covered']} modes, HQ {r['high_quality_fraction']:.3f} ({r['seconds']:.0f} s){note}", flush=True)
    summary = summarize(results, args.divergences, time.time() - start)
    write_files(results, summary, common.result_stem("fgan_mode_coverage", args.quick, args.out))


if __name__ == "__main__":
    main()
