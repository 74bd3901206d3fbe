"""One run of the chain study: build the job's model with its networks, train it (evaluating the
chain every `eval_every` epochs), refine its critic and encoder against the frozen final generator,
and evaluate it once more."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from benchmarks import common
from studies.chain.evaluation import evaluate, transport_values
from studies.chain.generator import InjectiveGenerator, generator_injectivity
from studies.chain.refinement import refine_critic, refine_encoder
from studies.chain.settings import (
    COST, EVAL_SEED, NUM_MORE, QUICK, RING_STD, RUNNING_COLUMNS, fresh_points, held_out, load_settings, make_datamodule,
)


def build_model(job: dict, datamodule: Any, model_args: dict) -> Any:
    """The job's SinkhornGenerator or PrimalDual (Gaussian encoder, critic-free primal, cost l2),
    built with the InjectiveGenerator as G on the 2-D data unless the job asks for the config's MLP
    (every model of a dataset alike, so that they compare on the same generator network)."""
    generator = None
    if job["dataset"] == "gaussians" and job.get("generator", "injective") == "injective":
        generator = InjectiveGenerator(datamodule.dims[0], width=model_args["width"] // 2)
    if job["kind"] == "sinkhorn":
        from lightning_modules.sinkhorn_generator import SinkhornGenerator

        return SinkhornGenerator(data_shape=datamodule.dims, latent_dim=model_args["latent_dim"], cost=COST,
                                 width=model_args["width"], prior=model_args.get("prior", "gaussian"), generator=generator)
    from lightning_modules.primal_dual import PrimalDual

    return PrimalDual(data_shape=datamodule.dims, decoder=generator, **{
        **model_args, "divergence": job["divergence"], "lambda_": job["lambda"], "alpha": job["alpha"],
        "cost": COST, "encoder_type": "gaussian", "primal_estimator": "monte_carlo",
        "training_estimator": job.get("training_estimator", "critic"),
        **({"critic_activation": job["critic_activation"]} if job.get("critic_activation") else {})})


def fit(job: dict, epochs: int, train_batches: int | None, datamodule: Any = None, callbacks: list | None = None,
        validate: bool = True) -> tuple[Any, Any, Any]:
    """(model, datamodule, trainer): the job's model trained from seed job["seed"] on its dataset
    (`datamodule`, or the dataset's own), validating every epoch unless `validate` is false."""
    import lightning as L

    model_args, data_args = load_settings(job["dataset"])
    datamodule = datamodule or make_datamodule(job["dataset"], data_args, job.get("ring_std"))
    L.seed_everything(job["seed"], verbose=False)
    model = build_model(job, datamodule, model_args)
    trainer = common.bare_trainer(max_epochs=epochs, limit_train_batches=train_batches,
                                  limit_val_batches=None if validate else 0, callbacks=callbacks or [])
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule, trainer


def train_one(job: dict) -> dict:
    """Train one PrimalDual (or SinkhornGenerator) and evaluate it; runs in a worker process."""
    import lightning as L

    common.quiet_worker(1)  # tiny networks: one core per worker
    datamodule = make_datamodule(job["dataset"], load_settings(job["dataset"])[1], job.get("ring_std"))
    real = held_out(datamodule)
    # 2-D data: fresh points of the known mixture, for the less biased Monte Carlo D_f
    more_real = fresh_points(datamodule, NUM_MORE, 99) if job["dataset"] == "gaussians" else None
    history: list[dict] = []

    class Record(L.Callback):
        """The chain on (X, Y) every eval_every epochs, and what the module itself logged."""

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            epoch = trainer.current_epoch + 1
            if trainer.sanity_checking or (epoch % job["eval_every"] and epoch != job["epochs"]):
                return
            row = {"epoch": epoch, **evaluate(pl_module, real, more_real=more_real if epoch == job["epochs"] else None)}
            for key in ("primal", "dual", "dual_lower_bound", "latent_divergence_mc", "latent_divergence_critic"):
                value = trainer.callback_metrics.get(f"val/{key}")
                row[f"logged_{key}"] = float(value) if value is not None else math.nan
            history.append(row)

    sinkhorn = job["kind"] == "sinkhorn"
    start = time.time()
    model, datamodule, trainer = fit(job, job["epochs"], job["train_batches"], datamodule,
                                     [] if sinkhorn else [Record()], validate=not sinkhorn)
    seconds = time.time() - start
    model.eval()
    if sinkhorn:
        with torch.no_grad():
            fake = model.decode(torch.randn(len(real), model.latent_dim, generator=torch.Generator().manual_seed(EVAL_SEED)))
        final = transport_values(real.double(), fake.double())
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
        "critic_centre": None if sinkhorn else model.data_divergence.neutral_output,  # added to the critic's output
        "batches": trainer.fit_loop.epoch_loop.batch_progress.total.completed,
        "seconds": seconds,
        "final": final,
        "history": history,
    }
    if job["kind"] == "primal_dual" and job.get("injectivity"):
        result["injectivity"] = generator_injectivity(model, 20_000 if len(datamodule.dims) == 1 else 1_000)
    return result


def train_quick_generator(divergence: str, lambda_: float, seed: int) -> tuple[Any, Any]:
    """(model, datamodule): a PrimalDual trained on the ring by the chain's quick recipe (injective G,
    MaxMin data critic, encoders on the critic-free estimate, validation off), in eval mode. The
    lambda-limit studies take its generator as their fixed G."""
    job = {"kind": "primal_dual", "dataset": "gaussians", "divergence": divergence, "lambda": lambda_,
           "alpha": load_settings("gaussians")[0]["alpha"], "training_estimator": "monte_carlo",
           "critic_activation": "maxmin", "ring_std": RING_STD, "seed": seed}
    model, datamodule, _ = fit(job, QUICK["epochs"]["gaussians"], QUICK["train_batches"]["gaussians"], validate=False)
    return model.eval(), datamodule
