"""Image callbacks: sample grids saved as PNG files and sent to every logger that takes images.

Images are assumed in `value_range` (the datamodules' [-1, 1] by default) and mapped to [0, 1]
for display; 2-D point data get a scatter plot of held-out data against samples instead.
The helpers here (`output_dir`, `log_image`, `image_grid`, `figure_image`) are shared with the
reconstruction and interpolation callbacks of `callbacks/reconstruction.py`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image

from callbacks.protocol import require_methods


def output_dir(trainer: L.Trainer, subdir: str) -> str:
    """`<log_dir>/<subdir>` of the run (the default root dir when there is no logger), created.

    Call it on every rank, never inside an `is_global_zero` branch: `trainer.log_dir` broadcasts
    rank zero's directory, so a call on rank zero alone waits forever under DDP.
    """
    root = trainer.log_dir or trainer.default_root_dir
    path = os.path.join(root, subdir)
    os.makedirs(path, exist_ok=True)
    return path


def log_image(trainer: L.Trainer, key: str, image: Tensor) -> None:
    """Send a (3, H, W) image in [0, 1] to each logger that accepts images.

    TensorBoard gets `add_image`; a logger with a `log_image(key=, images=, step=)` method (W&B
    style) gets that; others (CSVLogger) get nothing: the PNG file is the record. A logger that
    fails gets a warning, not a crash: the picture is not worth a training run.
    """
    for logger in trainer.loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, image, global_step=trainer.global_step)
            elif callable(getattr(logger, "log_image", None)):  # W&B-style loggers
                logger.log_image(key=key, images=[image], step=trainer.global_step)
        except Exception as err:  # noqa: BLE001  (any logger failure: warn and train on)
            rank_zero_warn(
                f"{type(logger).__name__} could not log the image {key!r} ({type(err).__name__}: {err}); "
                "training goes on and the PNG file under <log_dir>/images is still written."
            )


def new_figure(size: float = 4.0, dpi: int = 100) -> Any:
    """A matplotlib Figure drawn by the Agg canvas, outside pyplot: no display needed, and the
    user's pyplot backend and open figures are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_image(fig: Any, path: str) -> Tensor:
    """Save a `new_figure` to `path` and return it as a (3, H, W) image in [0, 1]."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())  # (H, W, 4) uint8; the canvas gives a memoryview
    image = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1) / 255.0
    fig.savefig(path)
    return image  # (3, H, W)


def scatter_png(path: str, real: Tensor, fake: Tensor, title: str) -> Tensor:
    """Scatter plot of 2-D real vs generated points, written to `path`; returns it as an image."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.scatter(*real.T.cpu(), s=3, alpha=0.5, label="held-out data")
    ax.scatter(*fake.T.cpu(), s=3, alpha=0.5, label="samples")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")
    return figure_image(fig, path)  # (3, H, W)


def image_grid(images: Tensor, nrow: int, value_range: tuple[float, float] | None, min_side: int = 32) -> Tensor:
    """(N, C, H, W) -> (3, H', W') grid in [0, 1]; images smaller than `min_side` pixels are
    enlarged (nearest neighbour) so that 8x8 digits stay visible."""
    factor = max(1, -(-min_side // images.shape[-1]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    return make_grid(images, nrow=nrow, normalize=True, value_range=value_range, pad_value=1.0)


def seeded_samples(pl_module: L.LightningModule, num_samples: int, seed: int) -> Tensor:
    """`pl_module.sample(num_samples)` under a fixed seed, leaving the global RNG state untouched,
    so a grid shows the same latent codes every epoch."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return pl_module.sample(num_samples).detach()


class SampleGridCallback(L.Callback):
    """Every `every_n_epochs` validation epochs, save a grid of `num_samples` model samples.

    Needs `pl_module.sample(num_samples)`. Files: `<log_dir>/images/samples_epoch=NNNN.png`.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        nrow: int = 8,
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.nrow = nrow
        self.value_range = value_range
        self.seed = seed
        self._real_points: list[Tensor] = []
        self.last_path: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_methods(pl_module, self, ["sample"])

    def _due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if self._due(trainer) and x.ndim == 2 and sum(len(r) for r in self._real_points) < self.num_samples:
            self._real_points.append(x.detach().cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        real, self._real_points = self._real_points, []
        folder = output_dir(trainer, "images")  # on every rank: trainer.log_dir broadcasts
        if not trainer.is_global_zero:
            return
        samples = seeded_samples(pl_module, self.num_samples, self.seed).float().cpu()
        path = os.path.join(folder, f"samples_epoch={trainer.current_epoch:04d}.png")
        if samples.ndim == 2:  # (N, 2) points
            real_points = torch.cat(real)[: self.num_samples] if real else samples[:0]
            image = scatter_png(path, real_points[:, :2], samples[:, :2], f"epoch {trainer.current_epoch}")
        else:  # (N, C, H, W) images
            image = image_grid(samples, self.nrow, self.value_range)
            save_image(image, path)
        self.last_path = path
        log_image(trainer, "samples", image)
