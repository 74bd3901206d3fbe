"""Sample quality of every model of the project, and of pythae's WAE-MMD, on the offline digits.

Each model is trained on the training split of scikit-learn's 8x8 digits (1437 images, the
DigitsDataModule's default split, seed 0) with the same budget: `--epochs` epochs, batch size 64,
the same network widths (decoder / generator and encoder `width` 64, data critics 64, latent
critics 256 x 3 layers), otherwise at the settings of its digits config (configs/*_digits.yaml:
latent size, learning rates, lambda, n_critic, ...). Validation is off during training; the
last-epoch weights are evaluated. Three training seeds (`--seeds`) change the initial weights
and the latent draws (the data split and shuffling order stay those of the datamodule's seed 0).

After training, `--num-samples` (1437) samples are drawn (fixed latent seed) and compared with the
1437 training images by
- domain FID: the Frechet distance between Gaussian fits of the digits domain classifier's 64
  features (callbacks.features, the features of `FIDCallback(feature_extractor="domain")`,
  val/fid_digits; NOT Inception FID);
- the certified Sinkhorn bracket `wasserstein_bracket(train, samples, cost="l2sq", tol=0.01)`
  (docs/theory.md 5): `w_upper` >= W_c(train, samples) >= `w_lower`, c = |x - y|^2 on pixels in [-1, 1].
Reference row: the 360 held-out images (validation + test split) in place of samples (n = 360,
so its FID is biased upward relative to the models' n = 1437: a floor, not a target).

Both numbers above compare with the TRAINING images, so a model that memorised them would score
W = 0. The column `W held-out` guards against that: POT's exact W_c (same cost) between the 360
held-out images and the first 360 samples. For the reference row it is W_c between the held-out
images and 360 training images, i.e. what a perfect memoriser would score there.

Models: WAE-MMD, WAE-GAN, f-WAE (kl), f-GAN (jensen_shannon, kl, pearson), the Lipschitz f-GAN
(kl, spectrally normalised critic), PrimalDual (alpha 0.5), SinkhornGenerator (skipped, with a
note, if `lightning_modules.sinkhorn_generator` is missing) and pythae's WAE_MMD (the project's
digits encoder / decoder in pythae's wrappers, trained by pythae's BaseTrainer at the WAE-MMD
row's settings: lambda 10, IMQ, lr 1e-3, betas (0.5, 0.999), batch 64).

Jobs run in `--workers` processes of `--threads` torch threads each (default 2 x 1: tiny networks
gain more from two processes than from two threads). Timings here are not benchmarks.

    python -m benchmarks.quality --quick       # 10 epochs, 3 seeds, 2 workers
    python -m benchmarks.quality               # 50 epochs (the wae_digits config's), 3 seeds

Writes benchmarks/results/quality[_quick].csv (one row per model and seed), .json, and .png
(64 samples of each model, seed 0, side by side, with the data).
"""

from __future__ import annotations

import argparse
import time
from statistics import mean
from typing import Any

from benchmarks import common
from benchmarks.machine import machine_info
from benchmarks.quality_runs import (BATCH_SIZE, COST, WIDTH, digits, equalise_networks, reference_row, resolve_models,
                                     run_with_progress, train_one)

NAME = "quality"
CRITIC_WIDTH = 64
LATENT_CRITIC = {"width": 256, "depth": 3}

# name, digits config to start from, class path (None: the config's), overrides of its init_args.
MODELS: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("WAE-MMD", "wae_digits", None, {"latent_penalty": "mmd"}),
    ("WAE-GAN", "wae_digits", None, {"latent_penalty": "gan", "lambda_": 1.0}),
    ("f-WAE (kl)", "wae_digits", None, {"latent_penalty": "f", "divergence": "kl", "lambda_": 1.0}),
    ("f-GAN (jensen_shannon)", "fgan_digits", None, {"divergence": "jensen_shannon"}),
    ("f-GAN (kl)", "fgan_digits", None, {"divergence": "kl"}),
    ("f-GAN (pearson)", "fgan_digits", None, {"divergence": "pearson"}),
    ("Lipschitz f-GAN (kl, SN)", "fgan_digits", None, {"divergence": "kl", "lipschitz": "spectral_norm"}),
    ("PrimalDual (alpha 0.5)", "primal_dual_digits", "lightning_modules.primal_dual.PrimalDual", {"alpha": 0.5}),
    ("SinkhornGenerator", "sinkhorn_digits", "lightning_modules.sinkhorn_generator.SinkhornGenerator", {}),
    ("pythae WAE_MMD", "wae_digits", "pythae", {"latent_penalty": "mmd"}),
]


def equal_budget(class_path: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """The init_args with the widths made equal across models (only the arguments the class has)."""
    shared = {"width": WIDTH, "encoder_channels": None, "decoder_channels": None, "generator_channels": None,
              "critic_channels": None}
    return equalise_networks(class_path, init_args, shared, {"critic_width": CRITIC_WIDTH}, LATENT_CRITIC)


def model_jobs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(jobs, skipped models with the reason)."""
    models, skipped = resolve_models(MODELS, args, equal_budget)
    jobs = [{"model": name, "class_path": class_path, "init_args": init_args, "seed": seed, "epochs": args.epochs,
             "num_samples": args.num_samples, "threads": args.threads, "keep_samples": seed == args.seeds[0],
             "bracket_seconds": args.bracket_seconds}
            for name, class_path, init_args in models for seed in args.seeds]
    return jobs, skipped


# ---- summary, table, plot -----------------------------------------------------------------------


def summarize(results: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> dict[str, Any]:
    models = list(dict.fromkeys(r["model"] for r in results))
    per_model = []
    for name in models:
        rs = [r for r in results if r["model"] == name]
        fid_mean, fid_sd = common.mean_sd(r["fid"] for r in rs)
        w_mean, w_sd = common.mean_sd(r["w_upper"] for r in rs)
        lower_mean, _ = common.mean_sd(r["w_lower"] for r in rs)
        held_mean, held_sd = common.mean_sd(r.get("w_held_out") for r in rs)
        errors = [r["error"] for r in rs if r.get("error")]
        per_model.append({"model": name, "seeds": [r["seed"] for r in rs], "fid_mean": fid_mean, "fid_sd": fid_sd,
                          "w_upper_mean": w_mean, "w_upper_sd": w_sd, "w_lower_mean": lower_mean,
                          "w_held_out_mean": held_mean, "w_held_out_sd": held_sd,
                          "diverged_seeds": sum(r["fid"] is None for r in rs) - len(errors), "failed_seeds": len(errors),
                          "errors": errors, "train_seconds_mean": mean(r["train_seconds"] for r in rs)})
    summary: dict[str, Any] = {"models": per_model, "skipped": skipped, "verdicts": []}
    contenders = [m for m in per_model if not m["model"].startswith("data:") and m["fid_mean"] is not None]
    for key, label in (("fid", "domain FID"), ("w_upper", "Sinkhorn upper bound"),
                       ("w_held_out", "exact W to the held-out images")):
        ranked = sorted((m for m in contenders if m.get(f"{key}_mean") is not None), key=lambda m: m[f"{key}_mean"])
        if len(ranked) >= 2:
            best, second = ranked[0], ranked[1]
            gap = second[f"{key}_mean"] - best[f"{key}_mean"]
            spread = (best[f"{key}_sd"] or 0.0) + (second[f"{key}_sd"] or 0.0)
            summary["verdicts"].append(
                f"lowest {label}: {best['model']} ({best[f'{key}_mean']:.3g} +- {best[f'{key}_sd']:.2g}), "
                f"{gap:.3g} ({100 * gap / second[f'{key}_mean']:.0f}%) below the runner-up {second['model']} "
                f"({second[f'{key}_mean']:.3g} +- {second[f'{key}_sd']:.2g}); "
                + ("one seed each, so no spread to compare the gap with" if min(len(best["seeds"]), len(second["seeds"])) < 2
                   else f"the gap is {'larger' if gap > spread else 'not larger'} than the sum of their standard deviations"))
    data = next((m for m in per_model if m["model"].startswith("data:")), None)
    if data and data.get("w_held_out_mean") is not None:
        reference = data["w_held_out_mean"]
        close = [m["model"] for m in contenders
                 if m.get("w_held_out_mean") is not None and m["w_held_out_mean"] <= 1.05 * reference]
        summary["verdicts"].append(
            f"`W held-out` compares 360 points with 360 in every row: 360 training images score {reference:.3g} "
            "there (a perfect memoriser's score, and about what fresh draws of the digits would score); within 5% "
            f"of it: {', '.join(close) or 'no model'}. `W upper` is taken against the training images, so a model "
            "can rank well there by staying close to them")
    ours = next((m for m in per_model if m["model"] == "WAE-MMD"), None)
    peer = next((m for m in per_model if m["model"] == "pythae WAE_MMD"), None)
    if ours and peer and ours["fid_mean"] is not None and peer["fid_mean"] is not None:
        summary["verdicts"].append(
            f"WAE-MMD vs pythae WAE_MMD (same networks, objective and budget): FID {ours['fid_mean']:.3g} vs "
            f"{peer['fid_mean']:.3g}, Sinkhorn bound {ours['w_upper_mean']:.3g} vs {peer['w_upper_mean']:.3g}")
    return summary


def _pm(mean_value: float | None, sd: float | None, spec: str = ".3g") -> str:
    return "-" if mean_value is None else f"{mean_value:{spec}} +- {sd:.2g}"


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    header = ["model", "seeds", "domain FID (mean +- sd)", "W upper (mean +- sd)", "W lower (mean)",
              "W held-out (exact, n = 360)", "diverged seeds"]
    body = [[m["model"], len(m["seeds"]), _pm(m["fid_mean"], m["fid_sd"]), _pm(m["w_upper_mean"], m["w_upper_sd"]),
             common.fmt(m["w_lower_mean"]), _pm(m.get("w_held_out_mean"), m.get("w_held_out_sd")),
             str(m["diverged_seeds"]) + (f"; {m['failed_seeds']} failed: {m['errors'][0][:120]}" if m.get("failed_seeds") else "")]
            for m in s["models"]]
    body += [[m["model"], 0, m["note"], "", "", "", ""] for m in s["skipped"]]
    settings = result["settings"]
    lines = [common.markdown_table(header, body), "",
             f"{settings['epochs']} epochs, batch {BATCH_SIZE}, widths {WIDTH} (critics {CRITIC_WIDTH}, latent critics "
             f"{LATENT_CRITIC['width']}x{LATENT_CRITIC['depth']}); {settings['num_samples']} samples vs the 1437 training "
             "images; W: certified bracket on W_c, c = |x - y|^2 on pixels in [-1, 1], tol 1%; W held-out: exact W_c "
             "between the 360 held-out images and 360 samples (data row: 360 training images, a memoriser's score). "
             "Lower is better."]
    lines += [f"- {v}" for v in s["verdicts"]]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    panels = [(f"{r['model']}\n" + ("FID -" if r["fid"] is None else f"FID {r['fid']:.2f}"), r["samples"])
              for r in results if r.get("samples") is not None]
    common.sample_grids(panels, path, title, cols=6, size=2.4, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 epochs per run")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 50; quick 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", help="a subset of the model names")
    parser.add_argument("--num-samples", type=int, default=1437)
    parser.add_argument("--bracket-seconds", type=float, default=120.0, help="time budget of each bracket")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--no-pythae", action="store_true")
    args = common.parse_benchmark_arguments(parser)
    common.set_torch_threads(args.threads)
    args.epochs = args.epochs or (10 if args.quick else 50)
    known = [m[0] for m in MODELS]
    if args.models and set(args.models) - set(known):
        parser.error(f"unknown models {sorted(set(args.models) - set(known))}; valid: {known}")

    start = time.time()
    machine = machine_info()
    common.quiet_worker(args.threads)
    from callbacks.features import load_or_train_domain_features

    load_or_train_domain_features(digits(), common.DIGITS_FEATURE_PATH)  # once, before the workers read it
    jobs, skipped = model_jobs(args)
    for s in skipped:
        print(f"{s['model']}: {s['note']}")
    print(f"{len(jobs)} runs, {args.epochs} epochs each, {args.workers} worker(s) x {args.threads} thread(s)", flush=True)
    results = [reference_row(args.bracket_seconds)]
    results += run_with_progress(train_one, jobs, args.workers,
                                 lambda r: f"FID {r['fid']:.3f}, W upper {r['w_upper']:.3f}")
    elapsed = time.time() - start
    summary = summarize(results, skipped)
    settings = {"epochs": args.epochs, "seeds": args.seeds, "num_samples": args.num_samples, "batch_size": BATCH_SIZE,
                "width": WIDTH, "critic_width": CRITIC_WIDTH, "latent_critic": LATENT_CRITIC, "cost": COST,
                "workers": args.workers, "threads": args.threads,
                "init_args": {j["model"]: j["init_args"] for j in jobs}}
    rows = [{k: v for k, v in r.items() if k != "samples"} for r in results]
    payload = common.result_payload(NAME, args.quick, settings, rows, summary, machine, elapsed)
    stem = common.publish(payload, table(payload), args.out)
    plot(results, stem + ".png", f"64 samples per model (seed {args.seeds[0]}, {args.epochs} epochs); domain FID of that seed")
    print(f"wrote {stem}.png")


if __name__ == "__main__":
    main()
