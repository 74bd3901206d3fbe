"""How the f-WAE's latent critic estimate of D_f(Q_Z || P_Z) behaves with a deterministic encoder.

SPEC section 4: on a finite sample a deterministic encoder makes Q_Z discrete, so D_f(Q_Z || P_Z)
is infinite for unbounded f (kl) and the variational estimate keeps growing with the critic's
capacity and training time, while a bounded row (jensen_shannon, at most 2 log 2) stays bounded.
This script trains the digits WAE with a `kl` and a `jensen_shannon` latent critic of several
widths, with the encoder's penalty weight set to 0 (so the encoder does not fight the critic and the
estimate measures the divergence of a fixed-ish Q_Z), and prints the validation estimate per epoch.

    python benchmarks/latent_critic_growth.py [--epochs 40] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import lightning as L
import torch

from datamodules import DigitsDataModule
from lightning_modules import WAE


class EstimateHistory(L.Callback):
    """Records val/latent_penalty after every validation epoch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/latent_penalty"]))


def run(divergence: str, critic_width: int, lambda_: float, epochs: int, critic_lr: float) -> list[float]:
    L.seed_everything(0, verbose=False)
    model = WAE(
        data_shape=(1, 8, 8), latent_dim=8, latent_penalty="f", divergence=divergence, lambda_=lambda_,
        width=32, critic_width=critic_width, critic_lr=critic_lr,
    )
    history = EstimateHistory()
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[history],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return history.values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    start = time.time()
    for lambda_ in (0.0, 1.0):
        for divergence in ("kl", "jensen_shannon"):
            for width in (64, 256, 1024):
                values = run(divergence, width, lambda_, args.epochs, critic_lr=1e-3)
                rows.append({"divergence": divergence, "lambda": lambda_, "critic_width": width, "values": values})
    checkpoints = sorted({1, args.epochs // 4, args.epochs // 2, args.epochs})
    header = f"{'divergence':<15}{'lambda':>7}{'width':>7}" + "".join(f"{'ep ' + str(e):>10}" for e in checkpoints)
    print(header)
    for row in rows:
        cells = "".join(f"{row['values'][e - 1]:>10.3f}" for e in checkpoints)
        print(f"{row['divergence']:<15}{row['lambda']:>7g}{row['critic_width']:>7}{cells}")
    print(f"(validation estimate of D_f(Q_Z || P_Z); {time.time() - start:.0f} s on {torch.get_num_threads()} threads)")
    path = os.path.join(args.out, "latent_critic_growth.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["divergence", "lambda", "critic_width", "epoch", "estimate"])
        for row in rows:
            for epoch, value in enumerate(row["values"], start=1):
                writer.writerow([row["divergence"], row["lambda"], row["critic_width"], epoch, value])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
