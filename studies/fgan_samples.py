"""Why the f-GAN's samples were poor: one change at a time, measured on the digits and on MNIST.

Each variant is the f-GAN of a base recipe with some init_args changed (`VARIANTS`), trained for
`--steps` generator steps (batches of `BATCH`), then scored on `--num-samples` samples drawn in eval
mode (the module's `sample`) against real images with the shipped classifier of the data
(`callbacks/weights`, `benchmarks.quality_runs.image_scores`):
- domain FID (its 64 features; not Inception FID): on the digits against the 1437 training images
  (the digits quality table's reference), on MNIST against the 10000 test images;
- the classifier's mean confidence (mean max softmax; real images: 0.99 on MNIST) and the class
  balance of the samples (entropy of the predicted classes over log 10; 1: all classes equally);
- `fid_train_bn`: the FID of samples drawn with the generator's batch norm in training mode (batch
  statistics, batches of 500) instead of its running averages: a large difference would blame
  how batch norm is used at sampling time.

Base recipes (what the variants change):
- digits (8x8): configs/fgan_digits.yaml's model (jensen_shannon, non-saturating, latent 16,
  generator width 32, critic [64, 128], Adam 2e-4 / 2e-4, betas (0.5, 0.999), n_critic 1,
  Gaussian prior), batch 64;
- mnist (28x28): the same recipe with the laptop networks (latent 32, generator [128, 64, 32], critic
  [32, 64]), batch 64.

Results accumulate: each run adds or replaces its (data, variant, seed, steps) row in
studies/results/fgan_samples_<data>.json (and .csv, .md), and the first seed's 64 samples are
drawn into fgan_samples_<data>.png (one panel per variant). docs/STUDIES.md section 10 reads them.

    python -m studies.fgan_samples --data digits --variants baseline resize --seeds 0 1 2
    python -m studies.fgan_samples --data mnist --variants baseline --steps 1500 --data-dir ../shared/data
    python -m studies.fgan_samples --data mnist --replot      # tables and figure from the JSON only
"""

from __future__ import annotations

import argparse
import os
import time
from statistics import mean
from typing import Any

from benchmarks import common
from studies.common import RESULTS

BATCH = 64
BASE: dict[str, dict[str, Any]] = {
    "digits": dict(latent_dim=16, divergence="jensen_shannon", generator_loss="non_saturating", lipschitz="none",
                   n_critic=1, prior="gaussian", width=32, critic_channels=[64, 128], lr=2e-4, critic_lr=2e-4,
                   betas=[0.5, 0.999]),
    "mnist": dict(latent_dim=32, divergence="jensen_shannon", generator_loss="non_saturating", lipschitz="none",
                  n_critic=1, prior="gaussian", generator_channels=[128, 64, 32], critic_channels=[32, 64], lr=2e-4,
                  critic_lr=2e-4, betas=[0.5, 0.999]),
}
DEFAULT_STEPS = {"digits": 2300, "mnist": 1500}
NUM_SAMPLES = {"digits": 1437, "mnist": 5000}
# The recipe the study arrived at (section 10 of docs/STUDIES.md, configs/fgan_mnist.yaml): the
# base recipe with resize + convolution in the generator.
FIXED = dict(upsample="resize")
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "resize": dict(upsample="resize"),
    "dcgan_init": dict(init="dcgan"),
    "critic_lr_x2": dict(critic_lr=4e-4),
    "lr_x2": dict(lr=4e-4, critic_lr=4e-4),
    "n_critic_2": dict(n_critic=2),
    "cube_prior": dict(prior="cube"),
    "critic_x2": {"critic_channels": "x2"},  # twice the base critic's channels
    "critic_deeper": {"critic_channels": "deeper"},  # one more stride-2 convolution
    "resize+dcgan_init": dict(upsample="resize", init="dcgan"),
    "resize+critic_x2": {"upsample": "resize", "critic_channels": "x2"},
    "resize+ttur": dict(upsample="resize", lr=1e-4, critic_lr=4e-4),
    "resize+cube_prior": dict(upsample="resize", prior="cube"),
    "fixed": FIXED,
    **{f"fixed {row}": {**FIXED, "divergence": row} for row in ("kl", "pearson", "gan", "total_variation")},
    "fixed kl SN": {**FIXED, "divergence": "kl", "lipschitz": "spectral_norm"},
}


def model_arguments(data: str, variant: str) -> dict[str, Any]:
    """The FGAN init_args of a variant on `data`."""
    args = {**BASE[data], **VARIANTS[variant]}
    base_critic = BASE[data]["critic_channels"]
    if args["critic_channels"] == "x2":
        args["critic_channels"] = [2 * c for c in base_critic]
    elif args["critic_channels"] == "deeper":
        args["critic_channels"] = [*base_critic, 2 * base_critic[-1]]
    return args


def load_data(data: str, data_dir: str) -> dict[str, Any]:
    """{"train": training images, "reference": the real images the samples are scored against, "name"}."""
    if data == "digits":
        from benchmarks.quality_runs import digits, split_images

        train = split_images(digits().train_set)
        return {"train": train, "reference": train, "name": "digits"}
    from benchmarks.quality_runs import mnist_tensors

    tensors = mnist_tensors(data_dir)
    return {"train": tensors["train"], "reference": tensors["test"], "name": "mnist"}


def train_loader(images: Any, steps: int, seed: int) -> Any:
    """Exactly `steps` shuffled batches of BATCH images (successive permutations, seeded)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    sampler = RandomSampler(range(len(images)), num_samples=steps * BATCH, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(images), batch_size=BATCH, sampler=sampler, drop_last=True)


def train_and_score(job: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one variant and score its samples; a failure (e.g. a non-finite loss) becomes a row with
    its error and the scores of the model where it stopped."""
    import lightning as L
    import torch

    from benchmarks.quality_runs import feature_fit, image_scores, shipped_classifier
    from lightning_modules.fgan import FGAN
    from maths.layers import eval_mode

    common.quiet_worker(job["threads"])
    data = data or load_data(job["data"], job["data_dir"])
    net = shipped_classifier(data["name"], tuple(data["train"].shape[1:]))
    L.seed_everything(job["seed"], verbose=False)
    model = FGAN(data_shape=tuple(data["train"].shape[1:]), **job["init_args"])
    trainer = common.bare_trainer(max_epochs=1, limit_val_batches=0)
    start, error = time.perf_counter(), ""
    try:
        trainer.fit(model, train_dataloaders=train_loader(data["train"], job["steps"], job["seed"]))
    except Exception as err:  # NonFiniteError and friends: score the model where it stopped
        error = f"{type(err).__name__}: {str(err)[:200]}"
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(10_000 + job["seed"])
    n = job["num_samples"]
    samples = torch.cat([model.sample(min(500, n - i), generator=generator) for i in range(0, n, 500)])
    generator = torch.Generator().manual_seed(10_000 + job["seed"])
    with torch.no_grad(), eval_mode(model):
        model.decoder.train()  # batch norm on batch statistics
        train_bn = torch.cat([model.decode(model.sample_latent(min(500, n - i), generator)) for i in range(0, n, 500)])
    real = feature_fit(data["reference"], net)
    scores = image_scores(samples, real, net)
    row = {"data": job["data"], "variant": job["variant"], "seed": job["seed"], "steps": job["steps"],
           "train_seconds": round(seconds, 1), "error": error, **scores,
           "fid_train_bn": image_scores(train_bn, real, net)["fid"],
           "samples": samples[:64].tolist() if job["keep_samples"] else None}
    return row


# ---- summary, table, figure ------------------------------------------------------------------------


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in rows)]:
        for steps in sorted({r["steps"] for r in rows if r["variant"] == variant}):
            rs = [r for r in rows if r["variant"] == variant and r["steps"] == steps]
            entry = {"variant": variant, "steps": steps, "seeds": [r["seed"] for r in rs],
                     "errors": sum(bool(r["error"]) for r in rs),
                     "train_seconds": mean(r["train_seconds"] for r in rs)}
            for key in ("fid", "confidence", "balance", "fid_train_bn"):
                entry[key], entry[key + "_sd"] = common.mean_sd([r[key] for r in rs])
            out.append(entry)
    return out


def table(data: str, rows: list[dict[str, Any]]) -> str:
    def pm(m: dict[str, Any], key: str, spec: str) -> str:
        if m[key] is None:
            return "-"
        return f"{m[key]:{spec}}" + (f" +- {m[key + '_sd']:{spec}}" if len(m["seeds"]) > 1 else "")

    body = [[m["variant"], m["steps"], " ".join(map(str, m["seeds"])), pm(m, "fid", ".1f"), pm(m, "confidence", ".3f"),
             pm(m, "balance", ".3f"), pm(m, "fid_train_bn", ".1f"), f"{m['train_seconds']:.0f}", m["errors"]]
            for m in summary_rows(rows)]
    header = ["variant", "steps", "seeds", "domain FID", "confidence", "class balance", "FID, BN on batch statistics",
              "training s", "stopped by an error"]
    reference = "the 1437 training digits" if data == "digits" else "the 10000 MNIST test images"
    return "\n".join([f"f-GAN variants on {data} (batch {BATCH}); FID against {reference}; mean +- sd over seeds.", "",
                      common.markdown_table(header, body)])


def plot(data: str, rows: list[dict[str, Any]], path: str) -> None:
    panels = []
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in rows)]:
        candidates = [r for r in rows if r["variant"] == variant and r.get("samples") is not None]
        if candidates:
            r = max(candidates, key=lambda r: (r["steps"], -r["seed"]))
            fid = "-" if r["fid"] is None else f"{r['fid']:.1f}"
            conf = "-" if r["confidence"] is None else f"{r['confidence']:.2f}"
            panels.append((f"{r['variant']}\nFID {fid}, conf. {conf} (seed {r['seed']})", r["samples"]))
    if panels:
        common.sample_grids(panels, path, f"f-GAN variants on {data}: 64 samples each", cols=5)


def write_outputs(data: str, rows: list[dict[str, Any]], out: str) -> None:
    stem = os.path.join(out, f"fgan_samples_{data}")
    text = f"# fgan_samples ({data})\n\n" + table(data, rows)
    common.write_json(stem + ".json", {"study": "fgan_samples", "data": data, "batch": BATCH, "base": BASE[data],
                                       "variants": VARIANTS, "rows": rows})
    common.write_csv(stem + ".csv", [{k: v for k, v in r.items() if k != "samples"} for r in rows])
    common.write_text(stem + ".md", text)
    plot(data, rows, stem + ".png")
    print(text)
    print(f"wrote {stem}.json, .csv, .md, .png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(BASE), required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["baseline"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help="generator steps (default: digits 2300 = 100 epochs, mnist 1500)")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: data/, else ../shared/data)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replot", action="store_true", help="rewrite the table and figure from the JSON only")
    args = common.parse_benchmark_arguments(parser, threads=1)
    from benchmarks.quality_runs import default_mnist_dir

    stem = os.path.join(args.out if args.out != common.RESULTS else RESULTS, f"fgan_samples_{args.data}")
    out = os.path.dirname(stem)
    os.makedirs(out, exist_ok=True)
    rows = (common.read_json(stem + ".json") or {}).get("rows", [])
    if args.replot:
        write_outputs(args.data, rows, out)
        return
    steps = args.steps or DEFAULT_STEPS[args.data]
    data = load_data(args.data, args.data_dir or default_mnist_dir())
    for variant in args.variants:
        for seed in args.seeds:
            job = {"data": args.data, "data_dir": args.data_dir, "variant": variant, "seed": seed, "steps": steps,
                   "init_args": model_arguments(args.data, variant), "threads": args.threads,
                   "num_samples": args.num_samples or NUM_SAMPLES[args.data], "keep_samples": seed == args.seeds[0]}
            row = train_and_score(job, data)
            print(f"{args.data} {variant} seed {seed}: FID {row['fid']}, confidence {row['confidence']}, "
                  f"balance {row['balance']}, FID (BN batch stats) {row['fid_train_bn']}, {row['train_seconds']} s"
                  + (f", {row['error']}" if row["error"] else ""), flush=True)
            key = (row["variant"], row["seed"], row["steps"])
            previous = {(r["variant"], r["seed"], r["steps"]): r for r in rows}
            if key in previous and row["samples"] is None:
                row["samples"] = previous[key].get("samples")
            rows = [r for r in rows if (r["variant"], r["seed"], r["steps"]) != key] + [row]
            common.write_json(stem + ".json", {"rows": rows})  # after every run: nothing lost if stopped
    write_outputs(args.data, rows, out)


if __name__ == "__main__":
    main()
