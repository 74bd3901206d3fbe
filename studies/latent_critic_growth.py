"""How the f-WAE's latent critic estimate of D_f(Q_Z || P_Z) behaves with a deterministic encoder.

docs/theory.md 4.2: on a finite sample a deterministic encoder makes Q_Z discrete, so D_f(Q_Z || P_Z)
is infinite for unbounded f (kl), and a variational estimate of it is bounded only by what the
critic can represent and learn; for a bounded row (jensen_shannon, at most 2 log 2) the divergence
itself is bounded. This script trains the digits WAE with a `kl` and a `jensen_shannon` latent
critic of widths 64, 256 and 1024, with the encoder's penalty weight lambda = 0 (the encoder does
not fight the critic, so the estimate measures the divergence of a fixed-ish Q_Z) and lambda = 1,
and records the validation estimate (`val/latent_penalty`) every epoch.

    python -m studies.latent_critic_growth [--epochs 40] [--out studies/results]

Writes studies/results/latent_critic_growth.csv (one row per run and epoch); docs/STUDIES.md reads it.
"""

from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch

from benchmarks import common
from studies.common import RESULTS

DIVERGENCES = ("kl", "jensen_shannon")
WIDTHS = (64, 256, 1024)
LAMBDAS = (0.0, 1.0)


class EstimateHistory(L.Callback):
    """Records val/latent_penalty after every validation epoch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/latent_penalty"]))


def run(divergence: str, critic_width: int, lambda_: float, epochs: int, critic_lr: float) -> list[float]:
    """The validation estimate per epoch of one digits WAE with an f latent penalty."""
    from datamodules import DigitsDataModule
    from lightning_modules import WAE

    L.seed_everything(0, verbose=False)
    model = WAE(
        data_shape=(1, 8, 8), latent_dim=8, latent_penalty="f", divergence=divergence, lambda_=lambda_,
        width=32, critic_width=critic_width, critic_lr=critic_lr,
    )
    history = EstimateHistory()
    trainer = common.bare_trainer(max_epochs=epochs, callbacks=[history], accelerator="auto",
                                  num_sanity_val_steps=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return history.values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    common.quiet_lightning()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    start = time.time()
    for lambda_ in LAMBDAS:
        for divergence in DIVERGENCES:
            for width in WIDTHS:
                values = run(divergence, width, lambda_, args.epochs, critic_lr=1e-3)
                rows.append({"divergence": divergence, "lambda": lambda_, "critic_width": width, "values": values})
    checkpoints = sorted({1, args.epochs // 4, args.epochs // 2, args.epochs} - {0})
    header = f"{'divergence':<15}{'lambda':>7}{'width':>7}" + "".join(f"{'ep ' + str(e):>10}" for e in checkpoints)
    print(header)
    for row in rows:
        cells = "".join(f"{row['values'][e - 1]:>10.3f}" for e in checkpoints)
        print(f"{row['divergence']:<15}{row['lambda']:>7g}{row['critic_width']:>7}{cells}")
    print(f"(validation estimate of D_f(Q_Z || P_Z); {time.time() - start:.0f} s on {torch.get_num_threads()} threads)")
    path = os.path.join(args.out, "latent_critic_growth.csv")
    common.write_csv(path, [
        {"divergence": row["divergence"], "lambda": row["lambda"], "critic_width": row["critic_width"], "epoch": epoch,
         "estimate": value}
        for row in rows for epoch, value in enumerate(row["values"], start=1)])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
