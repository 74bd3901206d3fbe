"""One run of the quality benchmark (`benchmarks.quality`), in a worker process: train a model of the
project (or pythae's WAE_MMD) on the digits' training split, draw samples, and score them against
the training images (domain FID, certified Sinkhorn bracket) and the held-out images (exact W_c)."""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks import common
from benchmarks.pythae_peer import import_pythae, pythae_wae_mmd

BATCH_SIZE = 64
WIDTH = 64
COST = "l2sq"


def import_class(class_path: str) -> type:
    """The class named by a dotted path, e.g. lightning_modules.primal_dual.PrimalDual."""
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


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
    import contextlib
    import io
    import tempfile

    import torch
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    from lightning_modules.networks import build_decoder, build_encoder

    a = job["init_args"]
    shape, latent = datamodule.dims, a["latent_dim"]
    model = pythae_wae_mmd(build_encoder(shape, latent, WIDTH), build_decoder(shape, latent, WIDTH, None, "tanh"),
                           shape, latent, a["lambda_"])
    train = datamodule.train_set
    dataset = BaseDataset(split_images(train), torch.stack([train[i][1] for i in range(len(train))]))
    with tempfile.TemporaryDirectory(prefix="pythae_quality_") as out, contextlib.redirect_stderr(io.StringIO()):
        config = BaseTrainerConfig(output_dir=out, num_epochs=job["epochs"], per_device_train_batch_size=BATCH_SIZE,
                                   learning_rate=a["lr"], optimizer_params={"betas": tuple(a["betas"])}, no_cuda=True,
                                   seed=job["seed"])
        trainer = BaseTrainer(model, train_dataset=dataset, training_config=config)
        trainer.train()
    model = trainer.model.eval()  # the last epoch's weights, as for the other models

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
