"""What the FID and Sinkhorn callbacks cost per validation, against a digits training epoch (docs/theory.md 5, 6).

The WAE of configs/wae_digits.yaml (WAE-MMD, width 64, latent 8, batch 64, 8x8 digits; its
SampleGridCallback, logger and checkpointing left out) is trained for `--epochs` epochs:

- once without evaluation callbacks: the epoch time (training + the module's own validation
  loop), median over the epochs after the first;
- once per num_samples in {1000, 5000, 10000} with `FIDCallback(feature_extractor="domain",
  num_samples=N)`: the callback's time per validation (its `on_validation_epoch_end`: sampling N
  images from the WAE in batches of 500, the metric's update on them and its compute), median
  over the epochs after the first (the first also collects the real statistics, reported apart),
  and its share of an epoch = fid / (epoch + fid). The split between sampling, the metric's update
  and compute is measured directly on the same metric after training;
- once with `SinkhornBoundCallback()` at its defaults (num_samples 1000, tol 1%; its default
  `exact="auto"` computes the exact value by POT's `ot.emd2` at this size) and once with
  `exact=False` (the certified Sinkhorn bracket): the time per validation (sampling 1000 images +
  the solve between them and 1000 held-out images). The digits' default validation split has
  only 180 images, so these runs use val_fraction 0.6 (1078 validation images); their share is
  taken against the standard epoch.

The domain feature extractor is trained once (500 steps) and cached in
runs/benchmarks/fid_features_digits_1x8x8.pt (its training time is reported, not counted).
Process settings as in benchmarks/common.py (2 threads, glibc allocator settings re-exec).

    python -m benchmarks.fid_cost --quick      # 4 epochs per run
    python -m benchmarks.fid_cost              # 10 epochs per run

Writes benchmarks/results/fid_cost[_quick].csv and .json.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from typing import Any

from benchmarks import common
from benchmarks.machine import machine_at_start

NAME = "fid_cost"
CONFIG = "wae_digits"
FEATURE_PATH = common.DIGITS_FEATURE_PATH
SAMPLE_COUNTS = (1000, 5000, 10000)


def timed(callback_cls: type) -> type:
    """A subclass of an evaluation callback that times its validation hooks: `epoch_end_seconds`
    (one entry per validation) and `batch_seconds` (the real-sample collection, summed)."""

    class Timed(callback_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.epoch_end_seconds: list[float] = []
            self.batch_seconds = 0.0

        def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            super().on_validation_batch_end(*args, **kwargs)
            self.batch_seconds += time.perf_counter() - start

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            start = time.perf_counter()
            super().on_validation_epoch_end(trainer, pl_module)
            if not trainer.sanity_checking:
                self.epoch_end_seconds.append(time.perf_counter() - start)

    Timed.__name__ = f"Timed{callback_cls.__name__}"
    return Timed


def train(epochs: int, callbacks: list[Any], data_overrides: dict[str, Any] | None = None) -> tuple[Any, list[float]]:
    """Train the config's WAE on digits for `epochs`; returns (model, seconds per epoch)."""
    import lightning as L

    from datamodules import DigitsDataModule
    from lightning_modules.wae import WAE

    model_args, data_args, _ = common.config_parts(CONFIG)
    L.seed_everything(0, verbose=False)
    datamodule = DigitsDataModule(**{**data_args, **(data_overrides or {})})
    model = WAE(data_shape=datamodule.dims, **model_args)
    epoch_seconds: list[float] = []

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            epoch_seconds.append(time.perf_counter() - self.start)  # the validation loop ran inside

    trainer = common.bare_trainer(max_epochs=epochs, default_root_dir=os.path.join(common.ROOT, "runs", "benchmarks"),
                                  callbacks=[*callbacks, EpochTimer()])
    trainer.fit(model, datamodule=datamodule)
    return model, epoch_seconds


def feature_extractor() -> tuple[Any, float | None]:
    """The digits domain extractor from its cache (trained and saved there on first use), and the
    seconds its training took (None when it was loaded)."""
    from callbacks.features import load_domain_features, load_or_train_domain_features
    from datamodules import DigitsDataModule

    datamodule = DigitsDataModule(**common.config_parts(CONFIG)[1])
    datamodule.setup("fit")
    if load_domain_features(FEATURE_PATH, datamodule.dims, datamodule.num_classes) is not None:
        return load_or_train_domain_features(datamodule, FEATURE_PATH), None
    start = time.perf_counter()
    net = load_or_train_domain_features(datamodule, FEATURE_PATH)
    return net, time.perf_counter() - start


def split_fid(model: Any, metric: Any, count: int, repeats: int) -> dict[str, float]:
    """Median seconds of sampling `count` images (batches of 500), the metric's update on them, and
    its compute, measured directly on the callback's metric (real statistics kept)."""
    import torch

    sample_t, update_t, compute_t = [], [], []
    for _ in range(repeats):
        with torch.inference_mode():
            metric.reset()
        start = time.perf_counter()
        fakes = [model.sample(min(500, count - i)) for i in range(0, count, 500)]
        sample_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            for fake in fakes:
                metric.update(fake, real=False)
        update_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            metric.compute()
        compute_t.append(time.perf_counter() - start)
    return {"sample_seconds": common.median(sample_t), "update_seconds": common.median(update_t),
            "compute_seconds": common.median(compute_t)}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from callbacks.fid import FIDCallback
    from callbacks.sinkhorn import SinkhornBoundCallback

    _, extractor_seconds = feature_extractor()
    print(f"domain features: {'trained in %.1f s' % extractor_seconds if extractor_seconds else 'loaded'} "
          f"({os.path.relpath(FEATURE_PATH, common.ROOT)})", flush=True)
    _, epochs = train(args.epochs, [])
    epoch = common.median(epochs[1:])
    print(f"digits WAE epoch (training + validation loop): {epoch:.3f} s (median of {len(epochs) - 1}); "
          f"all: {' '.join(f'{e:.2f}' for e in epochs)}", flush=True)
    rows = []
    for count in args.samples:
        callback = timed(FIDCallback)(feature_extractor="domain", num_samples=count, feature_path=FEATURE_PATH)
        model, _ = train(args.epochs, [callback])
        per_validation = common.median(callback.epoch_end_seconds[1:])
        split = split_fid(model, callback.metric, count, args.split_repeats)
        row = {"callback": "FIDCallback(domain)", "num_samples": count, "solver": "domain features (64)",
               "seconds_per_validation": per_validation,
               "first_validation_seconds": callback.epoch_end_seconds[0], "real_side_seconds": callback.batch_seconds,
               "epoch_seconds": epoch, "share_of_epoch": per_validation / (epoch + per_validation),
               "validations": len(callback.epoch_end_seconds), **split}
        rows.append(row)
        print(f"FID, {count:>6} samples: {per_validation:.3f} s per validation ({100 * row['share_of_epoch']:.0f}% "
              f"of an epoch with it); sampling {split['sample_seconds']:.3f} s, update {split['update_seconds']:.3f} s, "
              f"compute {split['compute_seconds'] * 1e3:.1f} ms", flush=True)
    variants = [("SinkhornBoundCallback()", {})]
    if "exact" in inspect.signature(SinkhornBoundCallback.__init__).parameters:
        variants.append(("SinkhornBoundCallback(exact=False)", {"exact": False}))
    for label, kwargs in variants:
        sinkhorn = timed(SinkhornBoundCallback)(**kwargs)
        train(args.epochs, [sinkhorn], {"val_fraction": 0.6})
        per_validation = common.median(sinkhorn.epoch_end_seconds[1:])
        bracket = sinkhorn.last_bracket
        exact = bracket is not None and bracket.eps == 0.0 and bracket.iterations == 0
        rows.append({"callback": label, "num_samples": sinkhorn.num_samples,
                     "solver": "exact (POT ot.emd2)" if exact else "Sinkhorn bracket",
                     "seconds_per_validation": per_validation, "first_validation_seconds": sinkhorn.epoch_end_seconds[0],
                     "real_side_seconds": sinkhorn.batch_seconds, "epoch_seconds": epoch,
                     "share_of_epoch": per_validation / (epoch + per_validation),
                     "validations": len(sinkhorn.epoch_end_seconds),
                     "bracket_relative_width": bracket.relative_width if bracket else None,
                     "bracket_converged": bracket.converged if bracket else None})
        print(f"{label}, {sinkhorn.num_samples} samples ({rows[-1]['solver']}): {per_validation:.3f} s per validation "
              f"({100 * rows[-1]['share_of_epoch']:.0f}% of an epoch with it)", flush=True)
    return rows, {"epoch_seconds": epoch, "epoch_seconds_all": epochs, "extractor_training_seconds": extractor_seconds}


def table(result: dict[str, Any]) -> str:
    header = ["callback", "num_samples", "computes", "s / validation", "share of epoch", "sampling s",
              "metric update s", "compute ms", "first validation s"]
    body = [[r["callback"], r["num_samples"], r.get("solver", "-"), common.fmt(r["seconds_per_validation"]),
             f"{100 * r['share_of_epoch']:.0f}%", common.fmt(r.get("sample_seconds")), common.fmt(r.get("update_seconds")),
             common.fmt(1e3 * r["compute_seconds"], ".2g") if r.get("compute_seconds") is not None else "-",
             common.fmt(r["first_validation_seconds"])] for r in result["rows"]]
    s = result["summary"]
    return "\n".join([
        common.markdown_table(header, body), "",
        f"Digits WAE epoch (configs/wae_digits.yaml: 23 training batches of 64 + the validation loop): "
        f"{s['epoch_seconds']:.3f} s (median). share = s per validation / (epoch + s per validation), "
        "with the callback evaluating every epoch. The Sinkhorn rows' real samples come from a 1078-image "
        "validation split (val_fraction 0.6), since the default split has 180.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 epochs per run")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 10; quick 4); the first is not counted")
    parser.add_argument("--samples", type=int, nargs="+", default=list(SAMPLE_COUNTS))
    parser.add_argument("--split-repeats", type=int, default=3)
    args = common.parse_benchmark_arguments(parser)
    args.epochs = args.epochs or (4 if args.quick else 10)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not counted)")
    common.quiet_lightning()

    start = time.time()
    machine = machine_at_start()
    rows, summary = run(args)
    elapsed = time.time() - start
    settings = {"epochs": args.epochs, "samples": args.samples, "split_repeats": args.split_repeats,
                "config": f"configs/{CONFIG}.yaml"}
    payload = common.result_payload(NAME, args.quick, settings, rows, summary, machine, elapsed)
    common.publish(payload, table(payload), args.out)


if __name__ == "__main__":
    main()
