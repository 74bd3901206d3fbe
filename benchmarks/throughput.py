"""Training throughput of a WAE-MMD step at 28x28 against a plain PyTorch loop, pythae and the CPU's roof.

One WAE-MMD training step (docs/theory.md 3.3): encode a batch of 100 images of 28x28, decode, squared
Euclidean reconstruction cost + lambda (10) x the unbiased IMQ multi-scale MMD^2 between the codes
(d_z = 8) and N(0, I) draws, backward, one Adam step. Synthetic images, uniform in [-1, 1] (no
download; a throughput does not depend on what the pixels show). Networks from
configs/wae_mnist_gpu.yaml (the WAE paper's MNIST encoder 128-256-512-1024 channels, decoder
1024-512-256) and the variant with half the channels (64-128-256-512 / 512-256-128).

Contenders, each on its own copy of the same networks (same initial weights), fed by the same kind
of in-memory DataLoader (batch 100, shuffled):
- `lightning`: this project's `WAE` LightningModule through `lightning.Trainer` (logger,
  checkpointing, progress bar, model summary and validation off);
- `torch`: the same modules and loss functions (`transport.costs.cost`, `maths.mmd.mmd_unbiased`) in a plain
  loop with manual Adam steps: the gap to `lightning` is the framework's overhead;
- `pythae`: pythae's `WAE_MMD` around the same modules (BaseEncoder / BaseDecoder wrappers),
  stepped in a plain loop through `model(inputs)` + `loss.backward()` + Adam;
- `pythae_trainer`: the same pythae model through pythae's `BaseTrainer` (its own dataset,
  loader, progress bar and epoch-end model copy).
The contenders take turns (`--rounds`): in each round each runs `--warmup` untimed steps, then
`--windows` timed windows of `--steps` steps (time between the ends of the steps that bound the
window, so loading the batch is included). Images per second = the median over all windows.

Roof: the step's floating-point operations (torch's FlopCounterMode over one forward + backward,
per image) divided by the measured fp32 matmul rate of the CPU (two 4096 x 4096 matrices, same
threads): "images per second at the limit", and the fraction each contender achieves.

Process settings (benchmarks/common.py): 2 torch threads, denormals flushed, glibc allocator
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483648 (the script re-executes itself
with them), for every contender alike.

    python -m benchmarks.throughput --quick      # 1 round, 4 windows of 2 steps
    python -m benchmarks.throughput              # 3 rounds, 3 windows of 4 steps each

Writes benchmarks/results/throughput[_quick].csv (one row per network and contender) and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from typing import Any, Callable

from benchmarks import common
from benchmarks.machine import machine_at_start
from benchmarks.pythae_peer import PYTHAE_MATCHING, import_pythae, pythae_wae_mmd
from benchmarks.timing import matmul_gflops, window_rates
from benchmarks.wae_step import (
    BATCH, BETAS, IMAGE_SHAPE, LAMBDA, LATENT_DIM, LR, build_wae, check_same_objective, make_loader, network_variants,
    step_flops, synthetic_images, wae_mmd_loss,
)

NAME = "throughput"
CONTENDERS = ("lightning", "torch", "pythae", "pythae_trainer")
CONTENDER_LABELS = {
    "lightning": "this project, Lightning Trainer",
    "torch": "same modules, plain torch loop",
    "pythae": "pythae WAE_MMD, plain loop",
    "pythae_trainer": "pythae WAE_MMD, BaseTrainer",
}


# ---- the contenders: each runs `steps` steps and returns the perf_counter at each step's end ----


class LightningContender:
    """The project's WAE through lightning.Trainer; marks at `on_train_batch_end`."""

    def __init__(self, channels: dict[str, list[int]], images: Any) -> None:
        self.model = build_wae(channels)
        self.images = images

    def run(self, steps: int) -> list[float]:
        import lightning as L

        marks: list[float] = []

        class Marks(L.Callback):
            def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:
                marks.append(time.perf_counter())

        trainer = common.bare_trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, callbacks=[Marks()])
        trainer.fit(self.model, train_dataloaders=make_loader(self.images[: steps * BATCH]))
        return marks


class TorchContender:
    """The same modules and losses in a plain loop with manual Adam steps."""

    def __init__(self, channels: dict[str, list[int]], images: Any) -> None:
        import torch

        wae = build_wae(channels)
        self.encoder, self.decoder = wae.encoder.train(), wae.decoder.train()
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=LR, betas=BETAS)
        self.images = images

    def step(self, x: Any) -> None:
        loss = wae_mmd_loss(self.encoder, self.decoder, x)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def run(self, steps: int) -> list[float]:
        marks = []
        for (x,) in make_loader(self.images[: steps * BATCH]):
            self.step(x)
            marks.append(time.perf_counter())
        return marks


class PythaeContender:
    """pythae's WAE_MMD around the same modules, stepped through its forward in a plain loop."""

    def __init__(self, channels: dict[str, list[int]], images: Any) -> None:
        import torch

        wae = build_wae(channels)
        self.model = pythae_wae_mmd(wae.encoder, wae.decoder, IMAGE_SHAPE, LATENT_DIM, LAMBDA).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR, betas=BETAS)
        self.images = images

    def run(self, steps: int) -> list[float]:
        from pythae.data.datasets import DatasetOutput

        marks = []
        for (x,) in make_loader(self.images[: steps * BATCH]):
            loss = self.model(DatasetOutput(data=x)).loss
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            marks.append(time.perf_counter())
        return marks


class PythaeTrainerContender:
    """The same pythae model through pythae's BaseTrainer, one epoch of `steps` batches per run;
    marks from a TrainingCallback's `on_train_step_end`."""

    def __init__(self, channels: dict[str, list[int]], images: Any) -> None:
        wae = build_wae(channels)
        self.model = pythae_wae_mmd(wae.encoder, wae.decoder, IMAGE_SHAPE, LATENT_DIM, LAMBDA)
        self.images = images
        self._scratch = tempfile.TemporaryDirectory(prefix="pythae_throughput_")  # removed with the contender
        self.output_dir = self._scratch.name

    def run(self, steps: int) -> list[float]:
        import torch
        from pythae.data.datasets import BaseDataset
        from pythae.trainers import BaseTrainer, BaseTrainerConfig
        from pythae.trainers.training_callbacks import TrainingCallback

        marks: list[float] = []

        class Marks(TrainingCallback):
            def on_train_step_end(self, training_config: Any, **kwargs: Any) -> None:
                marks.append(time.perf_counter())

        data = self.images[: steps * BATCH]
        dataset = BaseDataset(data, torch.zeros(len(data)))
        config = BaseTrainerConfig(
            output_dir=self.output_dir, num_epochs=1, per_device_train_batch_size=BATCH, learning_rate=LR,
            optimizer_params={"betas": BETAS}, no_cuda=True,
        )
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm progress bar
            trainer = BaseTrainer(self.model, train_dataset=dataset, training_config=config, callbacks=[Marks()])
            trainer.train()
        torch.set_num_threads(common.THREADS)  # in case the trainer changed it (it does not in 0.1.2)
        return marks


FACTORIES: dict[str, Callable[..., Any]] = {
    "lightning": LightningContender,
    "torch": TorchContender,
    "pythae": PythaeContender,
    "pythae_trainer": PythaeTrainerContender,
}


# ---- the run -----------------------------------------------------------------------------------


def measure(channels: dict[str, list[int]], contenders: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Window rates (images / s) per contender, over `args.rounds` interleaved rounds."""
    steps = args.warmup + args.windows * args.steps
    images = synthetic_images(steps * BATCH)
    runners = {name: FACTORIES[name](channels, images) for name in contenders}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(args.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]  # alternate who goes first
        for name in order:
            marks = runners[name].run(steps)
            if len(marks) != steps:
                raise RuntimeError(f"{name} ran {len(marks)} steps instead of {steps}")
            window = window_rates(marks, args.steps, BATCH, args.warmup)
            rates[name] += window
            print(f"  round {round_index + 1}/{args.rounds} {name:<15} windows (img/s): "
                  + " ".join(f"{r:.1f}" for r in window), flush=True)
    return rates


def run(args: argparse.Namespace) -> dict[str, Any]:
    contenders = [c for c in args.contenders if not (args.no_pythae and c.startswith("pythae"))]
    if any(c.startswith("pythae") for c in contenders):
        import_pythae()
    common.quiet_lightning()

    machine = machine_at_start()
    print(f"matmul roof: two {args.matmul_size}^2 fp32 matrices on {common.THREADS} threads ...", flush=True)
    gflops = matmul_gflops(args.matmul_size, repeats=args.matmul_repeats)
    print(f"  {gflops:.0f} GFLOP/s")
    rows, summary = [], {"matmul_gflops": gflops, "networks": {}}
    variants = network_variants()
    for network in args.networks or list(variants):
        channels = variants[network]
        flops, forward_flops = step_flops(channels)
        limit = gflops * 1e9 / flops
        mismatch = check_same_objective(channels) if any(c.startswith("pythae") for c in contenders) else None
        print(f"\nnetworks {network} (decoder {'-'.join(map(str, channels['decoder_channels']))}): "
              f"{flops / 1e9:.2f} GFLOP / image / step ({flops / forward_flops:.2f}x the forward), "
              f"limit {limit:.0f} img/s" + (f"; pythae vs project: recon and MMD^2 differ by {mismatch['recon']:.1e}"
                                            f" and {mismatch['mmd']:.1e} (relative)" if mismatch else ""), flush=True)
        rates = measure(channels, contenders, args)
        medians = {name: common.median(r) for name, r in rates.items()}
        for name in contenders:
            rows.append({
                "network": network, "contender": name, "label": CONTENDER_LABELS[name],
                "images_per_second": medians[name], "window_min": min(rates[name]), "window_max": max(rates[name]),
                "windows": len(rates[name]), "gflop_per_image_step": flops / 1e9,
                "limit_images_per_second": limit, "fraction_of_limit": medians[name] / limit,
                "window_rates": [round(r, 3) for r in rates[name]],
            })
        net_summary = {"gflop_per_image_step": flops / 1e9, "step_over_forward": flops / forward_flops,
                       "limit_images_per_second": limit, "pythae_loss_relative_difference": mismatch}
        if "lightning" in medians and "torch" in medians:
            net_summary["lightning_overhead_percent"] = 100.0 * (medians["torch"] / medians["lightning"] - 1.0)
        for peer in ("pythae", "pythae_trainer"):
            if "lightning" in medians and peer in medians:
                net_summary[f"lightning_over_{peer}"] = medians["lightning"] / medians[peer]
        summary["networks"][network] = net_summary
    settings = {k: getattr(args, k) for k in ("rounds", "warmup", "windows", "steps", "matmul_size", "matmul_repeats")}
    settings.update(batch=BATCH, image_shape=IMAGE_SHAPE, latent_dim=LATENT_DIM, lambda_=LAMBDA, lr=LR, betas=BETAS,
                    contenders=contenders, flush_denormal=True)
    return {"rows": rows, "summary": summary, "settings": settings, "machine": machine}


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a result file's rows and the verdict lines under it."""
    header = ["networks (encoder channels)", "contender", "img/s (median)", "windows min-max", "GFLOP/img/step",
              "limit img/s", "of limit"]
    body = [[r["network"], r["label"], common.fmt(r["images_per_second"], ".1f"),
             f"{r['window_min']:.1f}-{r['window_max']:.1f} ({r['windows']})", common.fmt(r["gflop_per_image_step"], ".2f"),
             common.fmt(r["limit_images_per_second"], ".0f"), common.fmt(100 * r["fraction_of_limit"], ".0f") + "%"]
            for r in result["rows"]]
    lines = [common.markdown_table(header, body), ""]
    lines.append(f"fp32 matmul roof: {result['summary']['matmul_gflops']:.0f} GFLOP/s (measured).")
    for network, s in result["summary"]["networks"].items():
        parts = [f"step = {s['step_over_forward']:.2f}x forward FLOPs"]
        if "lightning_overhead_percent" in s:
            parts.append(f"Lightning overhead over the plain loop {s['lightning_overhead_percent']:+.1f}% (target < 10%)")
        if "lightning_over_pythae" in s:
            parts.append(f"this project / pythae loop = {s['lightning_over_pythae']:.2f}x (target >= 1)")
        if "lightning_over_pythae_trainer" in s:
            parts.append(f"/ pythae BaseTrainer = {s['lightning_over_pythae_trainer']:.2f}x")
        mismatch = s.get("pythae_loss_relative_difference")
        if mismatch:
            parts.append(f"pythae's recon and MMD^2 = ours to {mismatch['recon']:.0e} and {mismatch['mmd']:.0e} (relative)")
        lines.append(f"- {network}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def matching_table() -> str:
    """How pythae's WAE_MMD is matched to the project's WAE (pythae_peer.PYTHAE_MATCHING)."""
    return common.markdown_table(["", "this project", "pythae 0.1.2", ""], PYTHAE_MATCHING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 4 windows of 2 steps")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender per round")
    parser.add_argument("--windows", type=int, help="timed windows per contender per round (default 3; quick 4)")
    parser.add_argument("--steps", type=int, help="steps per window (default 4; quick 2)")
    parser.add_argument("--networks", nargs="+", help="network variants by encoder channels, e.g. 64-128-256-512")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--no-pythae", action="store_true", help="skip the pythae contenders")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--matmul-repeats", type=int, default=5)
    args = common.parse_benchmark_arguments(parser)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.windows = args.windows or (4 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 4)
    if min(args.rounds, args.warmup, args.windows, args.steps) < 1:
        parser.error("--rounds, --warmup, --windows and --steps must be positive")
    unknown = set(args.networks or []) - set(network_variants())
    if unknown:
        parser.error(f"unknown --networks {sorted(unknown)}; valid: {', '.join(network_variants())}")

    start = time.time()
    result = run(args)
    elapsed = time.time() - start
    payload = common.result_payload(NAME, args.quick, result["settings"], result["rows"], result["summary"],
                                    result["machine"], elapsed)
    common.publish(payload, table(payload), args.out)


if __name__ == "__main__":
    main()
