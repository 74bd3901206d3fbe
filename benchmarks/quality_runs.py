"""One run of the quality benchmark (`benchmarks.quality`), in a worker process: train a model of the
project (or pythae's WAE_MMD) on the digits' training split, draw samples, and score them against
the training images (domain FID, certified Sinkhorn bracket) and the held-out images (exact W_c).

The image scores that the MNIST table (`benchmarks.quality_mnist`) and the f-GAN study
(`studies.fgan_samples`) share are here too: the MNIST splits as tensors (`mnist_tensors`), and
`image_scores` (domain FID against held-out images, a classifier's mean confidence and the class
balance of the samples)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from benchmarks import common
from benchmarks.pythae_peer import import_pythae, pythae_wae_mmd, train_pythae_wae

BATCH_SIZE = 64
WIDTH = 64
COST = "l2sq"


def import_class(class_path: str) -> type:
    """The class named by a dotted path, e.g. lightning_modules.primal_dual.PrimalDual."""
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def run_with_progress(fn: Callable[[dict[str, Any]], dict[str, Any]], jobs: list[dict[str, Any]], workers: int,
                      scores: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """fn(job) for every job in worker processes (`common.map_in_workers`), printing one line per
    finished run: its model, seed, `scores(row)` (or its error, or "diverged" when its FID is None)
    and its training time. Returns the rows in the jobs' order."""
    rows = []
    for r in common.map_in_workers(fn, jobs, workers):
        rows.append(r)
        text = f"FAILED: {r['error']}" if r.get("error") else "diverged" if r["fid"] is None else scores(r)
        print(f"[{len(rows)}/{len(jobs)}] {r['model']:<26} seed {r['seed']}: {text} "
              f"({r['train_seconds']:.0f} s training)", flush=True)
    return rows


def load_config(name: str) -> tuple[str, dict[str, Any]]:
    """(class path, init_args) of configs/<name>.yaml; ("", {}) when the file is missing."""
    model = common.read_config(name).get("model", {})
    return model.get("class_path", ""), dict(model.get("init_args") or {})


def equalise_networks(class_path: str, init_args: dict[str, Any], shared: dict[str, Any], data_critic: dict[str, Any],
                      latent_critic: dict[str, int]) -> dict[str, Any]:
    """The init_args with the networks made equal across models, only the arguments the class has:
    `shared` for all, `data_critic` for a data critic (FGAN, PrimalDual), `latent_critic` ({"width",
    "depth"}) for a latent critic (PrimalDual's; the WAE's critic is one)."""
    import inspect

    params = inspect.signature(import_class(class_path).__init__).parameters
    wanted = dict(shared)
    if "latent_critic_width" in params:  # PrimalDual: a data critic and a latent critic
        wanted.update(data_critic, latent_critic_width=latent_critic["width"], latent_critic_depth=latent_critic["depth"])
    elif "latent_penalty" in params:  # WAE: its critic is the latent critic
        wanted.update(critic_width=latent_critic["width"], critic_depth=latent_critic["depth"])
    else:  # FGAN, SinkhornGenerator: a data critic where there is one
        wanted.update(data_critic)
    return {**init_args, **{k: v for k, v in wanted.items() if k in params}}


def resolve_models(
    models: list[tuple[str, str, str | None, dict[str, Any]]], args: Any,
    equalise: Callable[[str, dict[str, Any]], dict[str, Any]], equalise_pythae: bool = False,
) -> tuple[list[tuple[str, str, dict[str, Any]]], list[dict[str, Any]]]:
    """The quality tables' rows (name, config, class path or None for the config's or "pythae",
    overrides) resolved to (name, class path, init_args): the config's init_args, the overrides,
    then `equalise(class path, init_args)` (pythae's row: with its config's class when
    `equalise_pythae`). Rows not in `args.models`, or that cannot run, are skipped with the reason."""
    resolved, skipped = [], []
    for name, config, class_path, overrides in models:
        if args.models and name not in args.models:
            continue
        config_class, init_args = load_config(config)
        if class_path == "pythae":
            if args.no_pythae:
                skipped.append({"model": name, "note": "skipped: --no-pythae"})
                continue
            try:
                import_pythae()
            except ModuleNotFoundError as err:
                skipped.append({"model": name, "note": f"skipped: {err}"})
                continue
        else:
            class_path = class_path or config_class
            try:
                import_class(class_path)
            except (ImportError, AttributeError) as err:
                skipped.append({"model": name, "note": f"skipped: {class_path} is not available ({err})"})
                continue
        if not init_args:
            skipped.append({"model": name, "note": f"skipped: configs/{config}.yaml not found"})
            continue
        init_args = {**init_args, **overrides}
        if class_path != "pythae" or equalise_pythae:
            init_args = equalise(config_class if class_path == "pythae" else class_path, init_args)
        resolved.append((name, class_path, init_args))
    return resolved, skipped


def digits(seed: int = 0) -> Any:
    """The digits datamodule (its default split, seed 0), set up for fitting."""
    from datamodules import DigitsDataModule

    datamodule = DigitsDataModule(batch_size=BATCH_SIZE, seed=seed)
    datamodule.setup("fit")
    return datamodule


def split_images(subset: Any) -> Any:
    """The images of a dataset split, stacked."""
    import torch

    return torch.stack([subset[i][0] for i in range(len(subset))])  # (N, 1, 8, 8)


def train_lightning(job: dict[str, Any], datamodule: Any) -> Any:
    """One of the project's models, built from its init_args and trained with validation off."""
    cls = import_class(job["class_path"])
    model = cls(data_shape=datamodule.dims, **job["init_args"])
    trainer = common.bare_trainer(max_epochs=job["epochs"], limit_val_batches=0,
                                  default_root_dir=os.path.join(common.ROOT, "runs", "benchmarks"))
    trainer.fit(model, datamodule=datamodule)
    return lambda n, generator: model.sample(n, generator=generator)


def train_pythae(job: dict[str, Any], datamodule: Any) -> Any:
    """pythae's WAE_MMD with the WAE-MMD row's networks and settings, trained by its BaseTrainer."""
    import torch

    from lightning_modules.networks import build_decoder, build_encoder

    a = job["init_args"]
    shape, latent = datamodule.dims, a["latent_dim"]
    model = pythae_wae_mmd(build_encoder(shape, latent, WIDTH), build_decoder(shape, latent, WIDTH, None, "tanh"),
                           shape, latent, a["lambda_"])
    model = train_pythae_wae(model, split_images(datamodule.train_set), job["epochs"], BATCH_SIZE, a["lr"], a["betas"],
                             job["seed"])

    @torch.no_grad()
    def sample(n: int, generator: Any) -> Any:
        z = torch.randn(n, latent, generator=generator)
        return model.decoder(z)["reconstruction"]

    return sample


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run and its evaluation; a failure becomes a row with its `error`, so that one
    broken model does not stop the table."""
    import traceback

    try:
        return _train_one(job)
    except Exception as err:  # reported in the table and the CSV
        traceback.print_exc()
        return {"model": job["model"], "seed": job["seed"], "epochs": job["epochs"], "train_seconds": float("nan"),
                "finite": False, "samples": None, "fid": None, "w_lower": None, "w_upper": None, "w_converged": None,
                "w_relative_width": None, "w_held_out": None, "error": f"{type(err).__name__}: {err}"}


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch

    common.quiet_worker(job["threads"])
    L.seed_everything(job["seed"], verbose=False)
    datamodule = digits()
    start = time.perf_counter()
    if job["class_path"] == "pythae":
        import_pythae()
        sample = train_pythae(job, datamodule)
    else:
        sample = train_lightning(job, datamodule)
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(10_000 + job["seed"])
    samples = torch.cat([sample(min(500, job["num_samples"] - i), generator).detach()
                         for i in range(0, job["num_samples"], 500)])  # (n, 1, 8, 8)
    result = {k: job[k] for k in ("model", "seed", "epochs")}
    result.update(train_seconds=seconds, finite=bool(torch.isfinite(samples).all()),
                  samples=samples[:64].tolist() if job["keep_samples"] else None)
    result.update(evaluate(samples, split_images(datamodule.train_set), job["bracket_seconds"]))
    result["w_held_out"] = held_out_distance(samples, held_out_images(datamodule))
    return result


def held_out_images(datamodule: Any) -> Any:
    """The validation + test images, (360, 1, 8, 8)."""
    import torch

    datamodule.setup("test")
    return torch.cat([split_images(datamodule.val_set), split_images(datamodule.test_set)])


def held_out_distance(samples: Any, held_out: Any) -> float | None:
    """Exact W_c (POT, cost COST) between the held-out images and as many samples (None when non-finite)."""
    import torch

    from transport import exact_wasserstein

    first = samples[: len(held_out)].double()
    if not torch.isfinite(first).all():
        return None
    return exact_wasserstein(held_out.double(), first, COST)


def evaluate(samples: Any, real: Any, bracket_seconds: float) -> dict[str, Any]:
    """Domain FID and the certified bracket between real images and samples (None when non-finite)."""
    import torch

    from callbacks.features import load_domain_features
    from callbacks.fid import FrechetFeatureDistance
    from transport import wasserstein_bracket

    extractor = load_domain_features(common.DIGITS_FEATURE_PATH)
    if extractor is None:
        raise FileNotFoundError(f"the digits domain feature extractor {common.DIGITS_FEATURE_PATH} is missing; "
                                "the parent trains it")
    if not torch.isfinite(samples).all():
        return {"fid": None, "w_lower": None, "w_upper": None, "w_converged": None, "w_relative_width": None}
    metric = FrechetFeatureDistance(extractor)
    with torch.inference_mode():
        metric.update(real, real=True)
        metric.update(samples.float(), real=False)
        fid = float(metric.compute())
    bracket = wasserstein_bracket(real, samples, cost=COST, tol=0.01, max_seconds=bracket_seconds)
    return {"fid": fid, "w_lower": bracket.lower, "w_upper": bracket.upper, "w_converged": bracket.converged,
            "w_relative_width": bracket.relative_width}


def reference_row(bracket_seconds: float) -> dict[str, Any]:
    """The held-out images (validation + test splits) in place of samples."""
    datamodule = digits()
    held_out = held_out_images(datamodule)
    row = {"model": f"data: held-out images (n = {len(held_out)})", "seed": 0, "epochs": 0, "train_seconds": 0.0,
           "finite": True, "samples": held_out[:64].tolist()}
    row.update(evaluate(held_out, split_images(datamodule.train_set), bracket_seconds))
    row["w_held_out"] = held_out_distance(split_images(datamodule.train_set)[: len(held_out)], held_out)
    return row


# ---- scores of image samples shared with the MNIST table and the f-GAN study ---------------------


def default_mnist_dir() -> str:
    """Where the MNIST idx files are read from when no folder is given: `data/` of the repository
    if it holds MNIST/raw, else `../shared/data` beside the repository (the project's shared copy)."""
    for candidate in (os.path.join(common.ROOT, "data"), os.path.join(os.path.dirname(common.ROOT), "shared", "data")):
        if os.path.isdir(os.path.join(candidate, "MNIST", "raw")):
            return candidate
    return os.path.join(common.ROOT, "data")


def mnist_tensors(data_dir: str, seed: int = 0) -> dict[str, Any]:
    """MNIST as tensors in [-1, 1], split as `MNISTDataModule(data_dir, seed=seed)` splits it:
    {"train": (54000, 1, 28, 28), "train_labels", "val", "test": (10000, 1, 28, 28), "test_labels"}.
    Read from torchvision's uint8 arrays at once (x / 255 * 2 - 1, what the datamodule's ToTensor and
    Normalize(0.5, 0.5) give image by image), so that a benchmark does not decode 60000 images."""
    import torch

    from datamodules import MNISTDataModule

    datamodule = MNISTDataModule(data_dir=data_dir, seed=seed)
    datamodule.setup("fit")

    def scaled(dataset: Any) -> Any:
        return (dataset.data.to(torch.float32) / 255.0 * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 28, 28)

    full, test = datamodule.train_set.dataset, datamodule.test_set
    train_index, val_index = torch.tensor(datamodule.train_set.indices), torch.tensor(datamodule.val_set.indices)
    images = scaled(full)
    return {"train": images[train_index], "train_labels": full.targets[train_index], "val": images[val_index],
            "test": scaled(test), "test_labels": test.targets.clone()}


def shipped_classifier(name: str, dims: tuple[int, ...]) -> Any:
    """The package's feature network for `name` ("digits" or "mnist"): its `forward` gives the 64 FID
    features, its `classify` the class logits."""
    from callbacks.features import load_shipped_features

    net = load_shipped_features(name, tuple(dims), 10)
    if net is None:
        raise FileNotFoundError(f"callbacks/weights has no shipped feature network for {name} {tuple(dims)}")
    return net


def feature_fit(images: Any, net: Any, batch_size: int = 1000) -> tuple[Any, Any]:
    """(mean, covariance) in float64 of `net`'s 64 features of `images` (n, C, H, W): the real side of
    `image_scores`, computed once for many sample sets."""
    import torch

    from callbacks.fid import mean_cov

    with torch.inference_mode():
        f = torch.cat([net(chunk.float()).double() for chunk in images.split(batch_size)])
    return mean_cov(f.sum(0), f.T @ f, f.shape[0])


def image_scores(samples: Any, real: Any, net: Any, batch_size: int = 1000) -> dict[str, Any]:
    """Scores of `samples` (n, C, H, W) in [-1, 1] against held-out `real` images (or their
    `feature_fit`), with the shipped classifier `net`:
    - `fid`: the Frechet distance between Gaussian fits of its 64 features (the domain FID, as
      `FIDCallback(feature_extractor="domain")` computes it; not Inception FID);
    - `confidence`: its mean max softmax probability on the samples (1: every sample is read as one
      digit without doubt; about 0.99 on real test images);
    - `balance`: the entropy of the predicted classes' frequencies over log 10 (1: every class as
      often), and `classes`: those frequencies (10 numbers summing to 1).
    Non-finite samples give None everywhere."""
    import torch

    from callbacks.fid import frechet_distance, mean_cov

    if not torch.isfinite(samples).all():
        return {"fid": None, "confidence": None, "balance": None, "classes": None}

    def features_and_probabilities(x: Any) -> tuple[Any, Any]:
        feats, probs = [], []
        with torch.inference_mode():
            for chunk in x.float().split(batch_size):
                feats.append(net(chunk).double())
                probs.append(torch.softmax(net.classify(chunk), dim=1).double())
        return torch.cat(feats), torch.cat(probs)

    real_fit = real if isinstance(real, tuple) else feature_fit(real, net, batch_size)
    fake_features, probabilities = features_and_probabilities(samples)
    fake_fit = mean_cov(fake_features.sum(0), fake_features.T @ fake_features, fake_features.shape[0])
    fid = float(frechet_distance(*real_fit, *fake_fit))
    counts = torch.bincount(probabilities.argmax(1), minlength=probabilities.shape[1]).double()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    return {"fid": fid, "confidence": float(probabilities.max(1).values.mean()),
            "balance": float(entropy / torch.log(torch.tensor(float(len(freq)), dtype=torch.float64))),
            "classes": [round(float(v), 4) for v in freq]}

