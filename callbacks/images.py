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

from callbacks.base import EvaluationCallback


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


class SampleGridCallback(EvaluationCallback):
    """Every `every_n_epochs` validation epochs, save a grid of `num_samples` model samples (for
    2-D points: a scatter plot of held-out points and samples).

    Needs `pl_module.sample(num_samples)`. Files: `<log_dir>/images/samples_epoch=NNNN.png`;
    the same latent codes (from `seed`) every epoch.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        nrow: int = 8,
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, seed)
        self.num_samples = num_samples
        self.nrow = nrow
        self.value_range = value_range
        self.last_path: str | None = None

    def held_out_capacity(self, x: Tensor, trainer: L.Trainer) -> int:
        return self.num_samples if x.ndim == 2 else 0  # points for the scatter plot; images need none

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = output_dir(trainer, "images")  # on every rank: trainer.log_dir broadcasts
        if not trainer.is_global_zero:
            return
        samples = self.generate(trainer, pl_module, self.num_samples, self.num_samples).float().cpu()
        path = os.path.join(folder, f"samples_epoch={trainer.current_epoch:04d}.png")
        if samples.ndim == 2:  # (N, 2) points
            real = self.held_out if self.held_out is not None else samples[:0]
            image = scatter_png(path, real[:, :2].float(), samples[:, :2], f"epoch {trainer.current_epoch}")
        else:  # (N, C, H, W) images
            image = image_grid(samples, self.nrow, self.value_range)
            save_image(image, path)
        self.last_path = path
        log_image(trainer, "samples", image)
