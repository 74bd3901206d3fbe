"""The WAE-MMD step on real MNIST in each precision and speed option of this project, against pythae's
trainer, at the same budget: images per second and the final reconstruction beside it.

Every contender trains the same networks (`benchmarks.wae_step`: the WAE paper's MNIST networks, or
the variant with half the channels) from the same initial weights on the same MNIST training images
in the same order, for `--warmup` + `--windows` x `--steps` optimiser steps of batch 100:
- this project's `WAE` through the Lightning Trainer: `32-true`, `bf16-mixed`, `bf16-mixed` with
  `channels_last`, with `compile`, and with both (the model's hyperparameters; see
  `GenerativeModule.configure_model`);
- pythae's `WAE_MMD` around the same modules through its `BaseTrainer`: fp32 on a CPU, its `amp`
  flag on CUDA.
Speed: images per second of the timed windows (the warm-up steps, which include compilation, are
left out), median over windows and `--rounds`. Reconstruction: the squared error summed over pixels
of `--test-images` MNIST test images through the trained encoder and decoder, in eval mode and fp32,
mean over rounds. `--profile` adds an op-level table (torch.profiler) of one window of the fastest
project setting and of pythae: where the time goes.

MNIST comes from `--data-dir` (the folder holding MNIST/raw; by default `data/` or `../shared/data`
when one holds it). Without MNIST the images are synthetic and the reconstruction column is
meaningless (the table says so).

    python -m benchmarks.precision --data-dir ../shared/data --quick
    python -m benchmarks.precision --data-dir ../shared/data
    python -m benchmarks.precision --device cuda --data-dir DIR      # on a GPU (run by benchmarks.gpu_check)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from typing import Any

from benchmarks import common
from benchmarks.machine import machine_at_start
from benchmarks.pythae_peer import import_pythae, pythae_wae_mmd
from benchmarks.quality_runs import default_mnist_dir
from benchmarks.timing import window_rates
from benchmarks.wae_step import BATCH, BETAS, IMAGE_SHAPE, LAMBDA, LATENT_DIM, LR, build_wae, network_variants

NAME = "precision"
SETTINGS = {  # this project's contenders: Trainer precision and the model's speed options
    "32-true": ("32-true", {}),
    "bf16-mixed": ("bf16-mixed", {}),
    "bf16-mixed + channels_last": ("bf16-mixed", {"channels_last": True}),
    "bf16-mixed + compile": ("bf16-mixed", {"compile": True}),
    "bf16-mixed + channels_last + compile": ("bf16-mixed", {"channels_last": True, "compile": True}),
}
PYTHAE = "pythae BaseTrainer"


def mnist_images(data_dir: str | None, train: int, test: int) -> tuple[Any, Any, bool]:
    """(train images (N, 1, 28, 28), test images, real?) in [-1, 1], as the project's MNISTDataModule
    gives them; synthetic uniform images when `data_dir` is None."""
    import torch

    if data_dir is None:
        generator = torch.Generator().manual_seed(1)
        return (torch.rand(train, *IMAGE_SHAPE, generator=generator) * 2 - 1,
                torch.rand(test, *IMAGE_SHAPE, generator=generator) * 2 - 1, False)
    from datamodules import MNISTDataModule

    dm = MNISTDataModule(data_dir=data_dir)
    dm.setup("fit")
    pick = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(3))[:train].tolist()
    train_x = torch.stack([dm.train_set[i][0] for i in pick])
    test_x = torch.stack([dm.test_set[i][0] for i in range(test)])
    return train_x, test_x, True


def reconstruction(encoder: Any, decoder: Any, images: Any, device: str) -> float:
    """Mean over images of the squared error summed over pixels, in eval mode and fp32."""
    import torch

    encoder.eval(), decoder.eval()
    total = 0.0
    with torch.no_grad():
        for x in images.split(500):
            x = x.to(device)
            total += (decoder(encoder(x)) - x).pow(2).flatten(1).sum(1).sum().item()
    return total / len(images)


def run_project(setting: str, channels: dict, images: Any, args: argparse.Namespace) -> tuple[list[float], Any, Any]:
    """(step end times, encoder, decoder) of the project's WAE trained through Lightning."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    precision, options = SETTINGS[setting]
    model = build_wae(channels, **options)
    marks: list[float] = []

    class Marks(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if args.device == "cuda":
                import torch

                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    loader = DataLoader(TensorDataset(images), batch_size=BATCH, shuffle=False)
    trainer = common.bare_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Marks()], precision=precision,
                                  accelerator="gpu" if args.device == "cuda" else "cpu")
    trainer.fit(model, train_dataloaders=loader)
    return marks, model.encoder, model.decoder


def run_pythae(channels: dict, images: Any, args: argparse.Namespace) -> tuple[list[float], Any, Any]:
    """(step end times, encoder, decoder) of pythae's WAE_MMD through its BaseTrainer."""
    import torch
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    wae = build_wae(channels)
    model = pythae_wae_mmd(wae.encoder, wae.decoder, IMAGE_SHAPE, LATENT_DIM, LAMBDA)
    marks: list[float] = []

    class Marks(TrainingCallback):
        def on_train_step_end(self, training_config: Any, **kwargs: Any) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="pythae_precision_") as folder:
        config = BaseTrainerConfig(output_dir=folder, num_epochs=1, per_device_train_batch_size=BATCH, learning_rate=LR,
                                   optimizer_params={"betas": BETAS}, no_cuda=args.device != "cuda",
                                   amp=args.device == "cuda")
        # pythae shuffles its training loader: the same images, another order, for it alone
        with contextlib.redirect_stderr(io.StringIO()):
            BaseTrainer(model, train_dataset=BaseDataset(images, torch.zeros(len(images))), training_config=config,
                        callbacks=[Marks()]).train()
    common.set_torch_threads()
    return marks, wae.encoder.to(args.device), wae.decoder.to(args.device)


def profile_window(fn: Any) -> str:
    """The top operators by self time of one call of fn (torch.profiler), as a Markdown-ready text."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet_lightning()
    contenders = list(SETTINGS) + ([] if args.no_pythae else [PYTHAE])
    if not args.no_pythae:
        import_pythae()
    steps = args.warmup + args.windows * args.steps
    if args.data_dir is None and os.path.isdir(os.path.join(default_mnist_dir(), "MNIST", "raw")):
        args.data_dir = default_mnist_dir()
    train_x, test_x, real = mnist_images(args.data_dir, steps * BATCH, args.test_images)
    machine = machine_at_start()
    rows, profiles = [], {}
    for network in args.networks or [list(network_variants())[1]]:
        channels = network_variants()[network]
        rates: dict[str, list[float]] = {c: [] for c in contenders}
        recons: dict[str, list[float]] = {c: [] for c in contenders}
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for name in order:
                marks, encoder, decoder = (run_pythae(channels, train_x, args) if name == PYTHAE
                                           else run_project(name, channels, train_x, args))
                window = window_rates(marks, args.steps, BATCH, args.warmup)
                rates[name] += window
                recons[name].append(reconstruction(encoder, decoder, test_x, args.device))
                print(f"  {network} round {round_index + 1} {name:<38} img/s " + " ".join(f"{r:.1f}" for r in window)
                      + f"   recon {recons[name][-1]:.2f}", flush=True)
        reference = PYTHAE if PYTHAE in contenders else "32-true"
        base_rate, base_recon = common.median(rates[reference]), sum(recons[reference]) / args.rounds
        for name in contenders:
            rate, recon = common.median(rates[name]), sum(recons[name]) / args.rounds
            rows.append({"network": network, "contender": name, "images_per_second": rate,
                         "speed_over_reference": rate / base_rate, "reference": reference,
                         "test_reconstruction": recon, "reconstruction_over_reference": recon / base_recon,
                         "window_rates": [round(r, 2) for r in rates[name]], "reconstructions": recons[name]})
        if args.profile:
            fastest = max((r for r in rows if r["network"] == network and r["contender"] in SETTINGS),
                          key=lambda r: r["images_per_second"])["contender"]
            small = train_x[: (args.warmup + args.steps) * BATCH]
            profiles[f"{network}: {fastest}"] = profile_window(lambda: run_project(fastest, channels, small, args))
            if not args.no_pythae:
                profiles[f"{network}: {PYTHAE}"] = profile_window(lambda: run_pythae(channels, small, args))
    settings = {k: getattr(args, k) for k in ("rounds", "warmup", "windows", "steps", "test_images", "device")}
    settings.update(batch=BATCH, real_mnist=real, lambda_=LAMBDA, lr=LR, betas=BETAS, latent_dim=LATENT_DIM)
    return {"rows": rows, "settings": settings, "machine": machine, "summary": {"profiles": profiles}}


def table(result: dict[str, Any]) -> str:
    header = ["networks", "contender", "img/s (median)", "x reference", "test recon", "recon / reference"]
    body = [[r["network"], r["contender"], common.fmt(r["images_per_second"], ".1f"),
             common.fmt(r["speed_over_reference"], ".2f"), common.fmt(r["test_reconstruction"], ".2f"),
             common.fmt(r["reconstruction_over_reference"], ".3f")] for r in result["rows"]]
    lines = [common.markdown_table(header, body), ""]
    settings = result["settings"]
    lines.append(f"Reference: {result['rows'][0]['reference']}; {settings['warmup']} warm-up + {settings['windows']} x "
                 f"{settings['steps']} timed steps of batch {settings['batch']} per round, {settings['rounds']} round(s), "
                 f"on {settings['device']}; reconstruction on {settings['test_images']} test images"
                 + ("." if settings["real_mnist"] else " (SYNTHETIC images: the reconstruction column is meaningless)."))
    for name, text in result["summary"].get("profiles", {}).items():
        lines += ["", f"Profile of one window, {name}:", "", "```", text, "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 windows of 5 steps")
    parser.add_argument("--data-dir", help="the folder that holds MNIST/raw (default: data/ or ../shared/data when "
                                           "one holds it, else synthetic images)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--networks", nargs="+", help="by encoder channels (default: the half-width variant)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation happens there)")
    parser.add_argument("--windows", type=int, help="timed windows (default 4; quick 2)")
    parser.add_argument("--steps", type=int, help="steps per window (default 8; quick 5)")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--no-pythae", action="store_true")
    parser.add_argument("--profile", action="store_true", help="an op-level profile of the fastest setting and pythae")
    args = common.parse_benchmark_arguments(parser)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.windows = args.windows or (2 if args.quick else 4)
    args.steps = args.steps or (5 if args.quick else 8)
    start = time.time()
    result = run(args)
    payload = common.result_payload(NAME, args.quick, result["settings"], result["rows"], result["summary"],
                                    result["machine"], time.time() - start)
    common.publish(payload, table(payload), args.out)


if __name__ == "__main__":
    main()
