"""Sample quality of every model of the project on real MNIST, beside pythae's WAE_MMD, at an equal budget.

Each model starts from its laptop config (configs/*_mnist.yaml: latent size, learning rates,
lambda, n_critic, prior, ...) with the networks made equal wherever the model has them: the
generator / decoder of `build_decoder` with channels [128, 64, 32] (7x7x128 projection, two
doublings by resize + 3x3 convolution: `upsample="resize"`, docs/STUDIES.md section 10; PyTorch's
initialisation), the encoders [32, 64] (two stride-2 convolutions), the data critics
[32, 64], the latent critics 256 x 3 layers. Every model sees the same data: `--epochs` passes over
the 54000 training images of `MNISTDataModule`'s split (seed 0), batch 64 (SinkhornGenerator: 256,
its config's: `BATCH_SIZES`), shuffled by the
training seed; the quick mode uses the first `--train-images` of them. Validation is off; the
last weights are evaluated. pythae's WAE_MMD wraps the WAE-MMD row's encoder and decoder and trains
with its own BaseTrainer on the same images, batch, epochs and optimiser (lambda 10, IMQ, Adam lr
1e-3, betas (0.5, 0.999)).

After training, `--num-samples` samples (fixed latent seed) are scored against the 10000 held-out
TEST images with the shipped MNIST classifier (callbacks/weights/fid_mnist_1x28x28.pt, 98.6%
accurate; `benchmarks.quality_runs.image_scores`):
- domain FID: the Frechet distance between Gaussian fits of its 64 features (what
  `FIDCallback(feature_extractor="domain")` logs as val/fid_mnist; not Inception FID);
- confidence: its mean max softmax probability on the samples (recognisable digits score high);
- balance: the entropy of the predicted classes' frequencies over log 10 (1: all ten digits as often);
- W test: W_c(test, samples) between the first `--w-samples` test images and as many samples, c =
  |x - y|^2 summed over pixels in [-1, 1], from `transport.wasserstein_bracket(exact="auto")` (at
  this size POT's exact value: lower = upper);
- test recon (autoencoders): the mean over `--w-samples` test images of |x - G(E(x))|^2 summed over
  pixels (the same cost for every autoencoder, whatever cost it trained with).
Reference row: the 6000 validation images in place of samples (the floor of each score).

Each (model, seed) runs in a worker process (`--workers`, `--threads` torch threads each).

    python -m benchmarks.quality_mnist --quick      # 2 seeds, 1 epoch over 10240 images: under 10 minutes on 2 cores
    python -m benchmarks.quality_mnist              # 2 seeds, 1 epoch over the 54000 images: under 60 minutes

Writes benchmarks/results/quality_mnist[_quick].csv (one row per model and seed), .json and .png
(64 samples of each model, seed 0, beside test images).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from statistics import mean
from typing import Any

from benchmarks import common
from benchmarks.machine import machine_info
from benchmarks.pythae_peer import import_pythae, pythae_wae_mmd, train_pythae_wae
from benchmarks.quality_runs import default_mnist_dir, equalise_networks, import_class, resolve_models, run_with_progress

NAME = "quality_mnist"
BATCH_SIZE = 64
COST = "l2sq"
DECODER = dict(decoder_channels=[128, 64, 32], upsample="resize", init="default")
ENCODER_CHANNELS = [32, 64]
CRITIC_CHANNELS = [32, 64]
LATENT_CRITIC = {"width": 256, "depth": 3}
# The SinkhornGenerator's loss is OT between a data batch and a sample batch, whose minimiser averages
# digits when the batch is small: it trains on the batches of its config (the same images per epoch).
BATCH_SIZES = {"SinkhornGenerator": 256}
QUICK = {"epochs": 1, "train_images": 10240, "num_samples": 2000}
FULL = {"epochs": 1, "train_images": None, "num_samples": 5000}

# name, MNIST config to start from, class path (None: the config's), overrides of its init_args.
MODELS: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("WAE-MMD", "wae_mnist", None, {"latent_penalty": "mmd"}),
    ("WAE-GAN", "wae_mnist", None, {"latent_penalty": "gan", "lambda_": 1.0}),
    ("f-GAN (jensen_shannon)", "fgan_mnist", None, {"divergence": "jensen_shannon"}),
    ("f-GAN (gan)", "fgan_mnist", None, {"divergence": "gan"}),
    ("f-GAN (kl)", "fgan_mnist", None, {"divergence": "kl"}),
    ("f-GAN (pearson)", "fgan_mnist", None, {"divergence": "pearson"}),
    ("f-GAN (total_variation)", "fgan_mnist", None, {"divergence": "total_variation"}),
    ("PrimalDual", "primal_dual_mnist", None, {}),
    ("SinkhornGenerator", "sinkhorn_mnist", None, {}),
    ("pythae WAE_MMD", "wae_mnist", "pythae", {"latent_penalty": "mmd"}),
]


def equal_networks(class_path: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """The init_args with the networks made equal across models (only the arguments the class has)."""
    shared = {"upsample": DECODER["upsample"], "init": DECODER["init"], "width": 32,
              "decoder_channels": DECODER["decoder_channels"], "generator_channels": DECODER["decoder_channels"],
              "encoder_channels": ENCODER_CHANNELS}
    return equalise_networks(class_path, init_args, shared, {"critic_channels": CRITIC_CHANNELS}, LATENT_CRITIC)


def model_jobs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(jobs, skipped models with the reason)."""
    models, skipped = resolve_models(MODELS, args, equal_networks, equalise_pythae=True)
    jobs = [{"model": name, "class_path": class_path, "init_args": init_args, "seed": seed, "epochs": args.epochs,
             "train_images": args.train_images, "num_samples": args.num_samples, "w_samples": args.w_samples,
             "threads": args.threads, "data_dir": args.data_dir, "keep_samples": seed == args.seeds[0]}
            for name, class_path, init_args in models for seed in args.seeds]
    return jobs, skipped


# ---- one run (in a worker) ---------------------------------------------------------------------------


def _data(job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.quality_runs import mnist_tensors

    data = mnist_tensors(job["data_dir"])
    if job["train_images"]:
        data["train"] = data["train"][: job["train_images"]]
    return data


def _loader(images: Any, seed: int, batch_size: int) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train_lightning(job: dict[str, Any], train: Any) -> tuple[Any, Any]:
    """One of the project's models, trained with validation off. -> (sample(n, generator), reconstruct(x) or None)."""
    import torch

    model = import_class(job["class_path"])(data_shape=tuple(train.shape[1:]), **job["init_args"])
    trainer = common.bare_trainer(max_epochs=job["epochs"], limit_val_batches=0,
                                  default_root_dir=os.path.join(common.ROOT, "runs", "benchmarks"))
    trainer.fit(model, train_dataloaders=_loader(train, job["seed"], BATCH_SIZES.get(job["model"], BATCH_SIZE)))
    model.eval()

    def reconstruct(x: Any) -> Any:
        with torch.no_grad():
            return model.decode(model.encode(x))

    return (lambda n, generator: model.sample(n, generator=generator)), (reconstruct if hasattr(model, "encode") else None)


def train_pythae(job: dict[str, Any], train: Any) -> tuple[Any, Any]:
    """pythae's WAE_MMD around the WAE-MMD row's networks, trained by its BaseTrainer on the same images."""
    import torch

    from lightning_modules.networks import build_decoder, build_encoder

    a = job["init_args"]
    shape, latent = tuple(train.shape[1:]), a["latent_dim"]
    encoder = build_encoder(shape, latent, channels=a["encoder_channels"], init=a["init"])
    decoder = build_decoder(shape, latent, channels=a["decoder_channels"], output_activation="tanh",
                            upsample=a["upsample"], init=a["init"])
    model = pythae_wae_mmd(encoder, decoder, shape, latent, a["lambda_"])
    model = train_pythae_wae(model, train, job["epochs"], BATCH_SIZE, a["lr"], a["betas"], job["seed"])

    @torch.no_grad()
    def sample(n: int, generator: Any) -> Any:
        return model.decoder(torch.randn(n, latent, generator=generator))["reconstruction"]

    @torch.no_grad()
    def reconstruct(x: Any) -> Any:
        return model.decoder(model.encoder(x).embedding)["reconstruction"]

    return sample, reconstruct


def score(samples: Any, test: Any, net: Any, w_samples: int, test_fit: tuple[Any, Any]) -> dict[str, Any]:
    """image_scores against the test images (their feature statistics `test_fit`), and the W
    bracket between w_samples of each."""
    from benchmarks.quality_runs import image_scores
    from transport import wasserstein_bracket

    result = image_scores(samples, test_fit, net)
    if result["fid"] is None:
        return {**result, "w_lower": None, "w_upper": None, "w_method": None}
    bracket = wasserstein_bracket(test[:w_samples].double(), samples[:w_samples].double(), cost=COST, tol=0.01,
                                  exact="auto", max_seconds=120.0)
    return {**result, "w_lower": bracket.lower, "w_upper": bracket.upper,
            "w_method": getattr(bracket, "method", "exact" if bracket.eps == 0 else "sinkhorn")}


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run and its scores; a failure becomes a row with its `error`."""
    import traceback

    try:
        return _train_one(job)
    except Exception as err:  # reported in the table and the CSV
        traceback.print_exc()
        return {"model": job["model"], "seed": job["seed"], "train_seconds": float("nan"), "samples": None,
                "fid": None, "confidence": None, "balance": None, "classes": None, "w_lower": None, "w_upper": None,
                "recon": None, "error": f"{type(err).__name__}: {err}"}


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch

    from benchmarks.quality_runs import shipped_classifier
    from transport.costs import cost

    common.quiet_worker(job["threads"])
    data = _data(job)
    L.seed_everything(job["seed"], verbose=False)
    start = time.perf_counter()
    if job["class_path"] == "pythae":
        import_pythae()
        sample, reconstruct = train_pythae(job, data["train"])
    else:
        sample, reconstruct = train_lightning(job, data["train"])
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(10_000 + job["seed"])
    n = job["num_samples"]
    samples = torch.cat([sample(min(500, n - i), generator).detach() for i in range(0, n, 500)])  # (n, 1, 28, 28)
    net = shipped_classifier("mnist", tuple(samples.shape[1:]))
    result = {"model": job["model"], "seed": job["seed"], "epochs": job["epochs"], "train_images": len(data["train"]),
              "steps": job["epochs"] * math.ceil(len(data["train"]) / BATCH_SIZES.get(job["model"], BATCH_SIZE)),
              "train_seconds": seconds,
              "samples": samples[:64].tolist() if job["keep_samples"] else None, "error": ""}
    result.update(score(samples, data["test"], net, job["w_samples"], job["test_fit"]))
    result["recon"] = None
    if reconstruct is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a Gaussian encoder's draw
            x = data["test"][: job["w_samples"]]
            result["recon"] = float(torch.cat([cost(c, reconstruct(c), COST) for c in x.split(500)]).mean())
    return result


def reference_row(data_dir: str, w_samples: int) -> tuple[dict[str, Any], tuple[Any, Any]]:
    """The 6000 validation images in place of samples (the floor of every score), and the test
    images' feature statistics (`quality_runs.feature_fit`) that every run's scores reuse."""
    from benchmarks.quality_runs import feature_fit, mnist_tensors, shipped_classifier

    data = mnist_tensors(data_dir)
    net = shipped_classifier("mnist", (1, 28, 28))
    test_fit = feature_fit(data["test"], net)
    row = {"model": f"data: validation images (n = {len(data['val'])})", "seed": 0, "epochs": 0, "train_seconds": 0.0,
           "samples": data["val"][:64].tolist(), "error": "", "recon": None}
    row.update(score(data["val"], data["test"], net, w_samples, test_fit))
    return row, test_fit


# ---- summary, table, plot ----------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> dict[str, Any]:
    per_model = []
    for name in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == name]
        entry: dict[str, Any] = {"model": name, "seeds": [r["seed"] for r in rs],
                                 "failed_seeds": sum(bool(r.get("error")) for r in rs),
                                 "errors": [r["error"] for r in rs if r.get("error")],
                                 "train_seconds_mean": mean(r["train_seconds"] for r in rs)}
        for key in ("fid", "confidence", "balance", "w_upper", "w_lower", "recon"):
            entry[f"{key}_mean"], entry[f"{key}_sd"] = common.mean_sd(r.get(key) for r in rs)
        entry["diverged_seeds"] = sum(r.get("fid") is None for r in rs) - entry["failed_seeds"]
        per_model.append(entry)
    summary: dict[str, Any] = {"models": per_model, "skipped": skipped, "verdicts": []}
    contenders = [m for m in per_model if not m["model"].startswith("data:") and m["fid_mean"] is not None]
    for key, label, better in (("fid", "domain FID", min), ("confidence", "classifier confidence", max),
                               ("w_upper", "W to the test images", min)):
        ranked = sorted((m for m in contenders if m[f"{key}_mean"] is not None), key=lambda m: m[f"{key}_mean"],
                        reverse=better is max)
        if len(ranked) >= 2:
            best, second = ranked[0], ranked[1]
            gap = abs(second[f"{key}_mean"] - best[f"{key}_mean"])
            spread = (best[f"{key}_sd"] or 0.0) + (second[f"{key}_sd"] or 0.0)
            summary["verdicts"].append(
                f"{'highest' if better is max else 'lowest'} {label}: {best['model']} ({best[f'{key}_mean']:.3g} +- "
                f"{best[f'{key}_sd']:.2g}), runner-up {second['model']} ({second[f'{key}_mean']:.3g} +- "
                f"{second[f'{key}_sd']:.2g}); the gap {gap:.3g} is "
                f"{'larger' if gap > spread else 'not larger'} than the sum of their standard deviations")
    fids = {m["model"]: m["fid_mean"] for m in contenders}
    if fids:
        best = min(fids.values())
        within = [name for name, value in fids.items() if value <= 2 * best]
        summary["verdicts"].append(f"within 2x of the best domain FID ({best:.3g}): {', '.join(within)}")
    ours = next((m for m in per_model if m["model"] == "WAE-MMD"), None)
    peer = next((m for m in per_model if m["model"] == "pythae WAE_MMD"), None)
    if ours and peer and ours["fid_mean"] is not None and peer["fid_mean"] is not None:
        summary["verdicts"].append(
            f"WAE-MMD vs pythae WAE_MMD (same networks, objective, data and budget): FID {ours['fid_mean']:.3g} vs "
            f"{peer['fid_mean']:.3g}, test recon {common.fmt(ours['recon_mean'])} vs {common.fmt(peer['recon_mean'])}")
    return summary


def _pm(m: dict[str, Any], key: str, spec: str = ".3g") -> str:
    value, sd = m.get(f"{key}_mean"), m.get(f"{key}_sd")
    return "-" if value is None else f"{value:{spec}} +- {sd:.2g}"


def table(result: dict[str, Any]) -> str:
    s, settings = result["summary"], result["settings"]
    header = ["model", "seeds", "domain FID vs test", "confidence", "class balance", "W test (lower-upper)",
              "test recon", "training s", "diverged / failed seeds"]
    body = []
    for m in s["models"]:
        w = "-" if m["w_upper_mean"] is None else (
            _pm(m, "w_upper") if m["w_lower_mean"] == m["w_upper_mean"]
            else f"{m['w_lower_mean']:.4g}-{m['w_upper_mean']:.4g} (sd {m['w_upper_sd']:.2g})")
        failed = f"{m['diverged_seeds']} / {m['failed_seeds']}" + (f": {m['errors'][0][:100]}" if m["errors"] else "")
        body.append([m["model"], len(m["seeds"]), _pm(m, "fid"), _pm(m, "confidence", ".3f"), _pm(m, "balance", ".3f"),
                     w, _pm(m, "recon"), f"{m['train_seconds_mean']:.0f}", failed])
    body += [[m["model"], 0, m["note"], "", "", "", "", "", ""] for m in s["skipped"]]
    steps = settings["epochs"] * math.ceil(settings["train_images"] / BATCH_SIZE)
    lines = [common.markdown_table(header, body), "",
             f"{settings['epochs']} epoch(s) over {settings['train_images']} training images, batch {BATCH_SIZE} "
             f"({steps} batches per model; SinkhornGenerator batch 256); decoders [128, 64, 32] (resize + convolution), "
             f"encoders and data critics [32, 64], latent critics {LATENT_CRITIC['width']}x{LATENT_CRITIC['depth']}; "
             f"{settings['num_samples']} samples against the 10000 test images (domain FID, confidence, class balance); "
             f"W test: W_c between {settings['w_samples']} test images and as many samples, c = |x - y|^2 on pixels in "
             "[-1, 1] (one number: POT's exact value); test recon: mean |x - G(E(x))|^2 over as many test images. "
             "Mean +- sd over the seeds. Lower is better but for confidence and class balance."]
    lines += [f"- {v}" for v in s["verdicts"]]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    panels = [(f"{r['model']}\n" + ("FID -" if r.get("fid") is None else f"FID {r['fid']:.1f}, conf. {r['confidence']:.2f}"),
               r["samples"]) for r in results if r.get("samples") is not None]
    common.sample_grids(panels, path, title, cols=4, size=3.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['epochs']} epoch over {QUICK['train_images']} images, {QUICK['num_samples']} samples")
    parser.add_argument("--epochs", type=int, help=f"passes over the training images (default {FULL['epochs']})")
    parser.add_argument("--train-images", type=int, help="train on the first N training images (default: all 54000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", help="a subset of the model names")
    parser.add_argument("--num-samples", type=int, help=f"samples per run (default {FULL['num_samples']}; quick "
                                                        f"{QUICK['num_samples']})")
    parser.add_argument("--w-samples", type=int, default=2000, help="test images and samples of the W and recon columns")
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: data/, else ../shared/data)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--no-pythae", action="store_true")
    args = common.parse_benchmark_arguments(parser, threads=1)
    preset = QUICK if args.quick else FULL
    args.epochs = args.epochs or preset["epochs"]
    args.train_images = args.train_images or preset["train_images"]
    args.num_samples = args.num_samples or preset["num_samples"]
    args.data_dir = args.data_dir or default_mnist_dir()
    if not os.path.isdir(os.path.join(args.data_dir, "MNIST", "raw")):
        parser.error(f"no MNIST in {os.path.abspath(args.data_dir)}/MNIST/raw: pass --data-dir (the folder that holds "
                     "MNIST/raw/, see README.md's MNIST section)")
    known = [m[0] for m in MODELS]
    if args.models and set(args.models) - set(known):
        parser.error(f"unknown models {sorted(set(args.models) - set(known))}; valid: {known}")

    start = time.time()
    machine = machine_info()
    common.quiet_worker(args.threads)
    jobs, skipped = model_jobs(args)
    for s in skipped:
        print(f"{s['model']}: {s['note']}")
    print(f"{len(jobs)} runs, {args.epochs} epoch(s) over {args.train_images or 54000} images each, "
          f"{args.workers} worker(s) x {args.threads} thread(s)", flush=True)
    reference, test_fit = reference_row(args.data_dir, args.w_samples)
    for job in jobs:
        job["test_fit"] = test_fit  # the test images' feature statistics, computed once for every run
    results = [reference] + run_with_progress(
        train_one, jobs, args.workers, lambda r: f"FID {r['fid']:.2f}, confidence {r['confidence']:.3f}, W {r['w_upper']:.2f}")
    elapsed = time.time() - start
    summary = summarize(results, skipped)
    settings = {"epochs": args.epochs, "train_images": args.train_images or 54000, "seeds": args.seeds,
                "num_samples": args.num_samples, "w_samples": args.w_samples, "batch_size": BATCH_SIZE, "cost": COST,
                "decoder": DECODER, "encoder_channels": ENCODER_CHANNELS, "critic_channels": CRITIC_CHANNELS,
                "latent_critic": LATENT_CRITIC, "workers": args.workers, "threads": args.threads,
                "init_args": {j["model"]: j["init_args"] for j in jobs}}
    rows = [{k: v for k, v in r.items() if k != "samples"} for r in results]
    payload = common.result_payload(NAME, args.quick, settings, rows, summary, machine, elapsed)
    stem = common.publish(payload, table(payload), args.out)
    plot(results, stem + ".png", f"64 samples per model (seed {args.seeds[0]}; {args.epochs} epoch(s) over "
                                 f"{args.train_images or 54000} images); domain FID and confidence of that seed")
    print(f"wrote {stem}.png")


if __name__ == "__main__":
    main()
