"""Reconstruction and latent-interpolation pictures for modules with `encode` and `decode`.

- `ReconstructionGridCallback`: held-out validation images x next to G(E(x)), rows alternating
  originals / reconstructions; for 2-D points a scatter with a segment from each x to G(E(x)).
- `LatentInterpolationCallback`: for pairs of held-out images (x_a, x_b) with codes z_a = E(x_a),
  z_b = E(x_b), the decoded straight line

      x_t = G((1 - t) z_a + t z_b),   t in linspace(0, 1, steps),

  one row per pair (first and last columns are G(E(x_a)) and G(E(x_b))); for 2-D points the
  decoded paths drawn over the data.

Both use the same held-out data all run (the first validation batches after the sanity check,
kept on the CPU), run the module under `callbacks.base.frozen_eval` (eval mode, no gradients, a
fixed seed: a stochastic encoder draws the same codes every epoch), and write `<log_dir>/images/<name>_epoch=NNNN.png` on global rank zero,
also sent to every logger that takes images.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import save_image

from callbacks.base import EvaluationCallback, check_positive, frozen_eval
from callbacks.images import figure_image, image_grid, log_image, new_figure, output_dir


def interpolate_codes(z_a: Tensor, z_b: Tensor, steps: int) -> Tensor:
    """z_t = (1 - t) z_a + t z_b for t in linspace(0, 1, steps), exact at both ends.
    (P, *code), (P, *code) -> (P, steps, *code)."""
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    t = torch.linspace(0, 1, steps, dtype=z_a.dtype, device=z_a.device).view(1, steps, *[1] * (z_a.ndim - 1))
    return (1 - t) * z_a.unsqueeze(1) + t * z_b.unsqueeze(1)


def interleave_rows(top: Tensor, bottom: Tensor, ncol: int, fill: float) -> Tensor:
    """Rows of `ncol` items alternating top[k*ncol:(k+1)*ncol] / bottom[same]; a short last row is
    padded with items filled with `fill`. (N, *s), (N, *s) -> (2 * ceil(N / ncol) * ncol, *s)."""
    rows = math.ceil(len(top) / ncol)
    pad = rows * ncol - len(top)
    filler = torch.full((pad, *top.shape[1:]), fill, dtype=top.dtype)
    top, bottom = torch.cat([top, filler]), torch.cat([bottom, filler])
    pairs = torch.stack([top.view(rows, ncol, *top.shape[1:]), bottom.view(rows, ncol, *top.shape[1:])], dim=1)
    return pairs.reshape(-1, *top.shape[1:])  # (rows, 2, ncol, *s) -> (2 rows ncol, *s)


def reconstruction_figure(points: Tensor, reconstructions: Tensor, title: str) -> Any:
    """2-D points (N, 2), their reconstructions (N, 2), and a segment joining each pair."""
    from matplotlib.collections import LineCollection

    fig = new_figure()
    ax = fig.add_subplot()
    segments = torch.stack([points, reconstructions], dim=1).double().numpy()  # (N, 2 ends, 2)
    ax.add_collection(LineCollection(segments, colors="0.6", linewidths=0.6, zorder=1))
    ax.scatter(*points.T, s=6, zorder=2, label="held-out data")
    ax.scatter(*reconstructions.T, s=6, zorder=3, label="G(E(x))")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")
    return fig


def interpolation_figure(data: Tensor, paths: Tensor, title: str) -> Any:
    """Decoded latent paths (P, steps, 2), one line each with its ends marked, over data (N, 2)."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.scatter(*data.T, s=3, alpha=0.3, color="0.5", label="held-out data")
    for path in paths.double().numpy():
        ax.plot(path[:, 0], path[:, 1], marker=".", markersize=3, linewidth=1)
    ends = torch.cat([paths[:, 0], paths[:, -1]])
    ax.scatter(*ends.T, s=18, marker="x", color="black", zorder=3, label="G(E(x)) of the ends")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")
    return fig


def _check_batch(x: Tensor) -> None:
    if x.ndim not in (2, 4) or (x.ndim == 2 and x.shape[1] < 2):
        raise ValueError(
            "Reconstruction and interpolation pictures need validation batches of images (B, C, H, W) "
            f"or points (B, D) with D >= 2 (or a tuple/list whose first element is one); got {tuple(x.shape)}."
        )


def _codes(codes: Any, module: L.LightningModule) -> Tensor:
    if not isinstance(codes, Tensor):
        raise TypeError(
            f"{type(module).__name__}.encode(x) must return one Tensor of codes, got {type(codes).__name__}; "
            "wrap the module so that encode returns the code that decode takes (e.g. the mean)."
        )
    return codes


class _EncodeDecodeCallback(EvaluationCallback):
    """What both callbacks share: the protocol, the fixed held-out data, the output."""

    name = ""  # file stem and logger key
    required = ("encode", "decode")

    def __init__(self, num_images: int, num_points: int, every_n_epochs: int, value_range: Any, seed: int) -> None:
        super().__init__(every_n_epochs, seed)
        check_positive(num_images=num_images)
        if value_range is not None and (len(value_range) != 2 or not value_range[0] < value_range[1]):
            raise ValueError(f"value_range must be None (min-max scaling) or (low, high) with low < high, got {value_range}")
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self._capacity = {4: num_images, 2: num_points}  # by batch ndim: images or points
        self.last_path: str | None = None

    def held_out_capacity(self, x: Tensor, trainer: L.Trainer) -> int:
        _check_batch(x)
        return self._capacity[x.ndim]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = output_dir(trainer, "images")  # on every rank: trainer.log_dir broadcasts
        x = self.held_out
        if x is None:
            rank_zero_warn(f"{type(self).__name__} saw no validation batch, so it has nothing to draw.")
            return
        # Every rank runs the model (a sharded strategy needs all ranks in a forward); rank zero draws.
        with frozen_eval(pl_module, self.seed, pl_module.device):
            result = self._compute(pl_module, x)
        if not trainer.is_global_zero or result is None:
            return
        path = os.path.join(folder, f"{self.name}_epoch={trainer.current_epoch:04d}.png")
        image = self._draw(path, x, result, f"{self.name}, epoch {trainer.current_epoch}")
        self.last_path = path
        log_image(trainer, self.name, image)

    def _to_module(self, x: Tensor, pl_module: L.LightningModule) -> Tensor:
        dtype = pl_module.dtype if x.is_floating_point() else None  # e.g. half weights under 16-true
        return x.to(device=pl_module.device, dtype=dtype)

    def _compute(self, pl_module: L.LightningModule, x: Tensor) -> Tensor | None:
        raise NotImplementedError

    def _draw(self, path: str, x: Tensor, result: Tensor, title: str) -> Tensor:
        raise NotImplementedError


class ReconstructionGridCallback(_EncodeDecodeCallback):
    """Every `every_n_epochs` validation epochs, save held-out data beside decode(encode(x)).

    Args:
        num_images: held-out images (or 2-D points) shown, the same ones every epoch.
        every_n_epochs: draw at the end of every n-th validation epoch (never in the sanity check).
        nrow: images per row; rows alternate originals / their reconstructions.
        value_range: range of the data, mapped to [0, 1] for display; None: min-max of the grid.
        seed: seed for the encoder and decoder's randomness (the same draws every epoch).

    Needs `pl_module.encode(x)` and `pl_module.decode(z)` (checked at `setup`). Files:
    `<log_dir>/images/reconstructions_epoch=NNNN.png`; logger key `reconstructions`.
    """

    name = "reconstructions"

    def __init__(
        self,
        num_images: int = 32,
        every_n_epochs: int = 1,
        nrow: int = 8,
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        seed: int = 0,
    ) -> None:
        super().__init__(num_images, num_images, every_n_epochs, value_range, seed)
        if nrow < 1:
            raise ValueError(f"nrow must be a positive integer, got {nrow}")
        self.num_images = num_images
        self.nrow = nrow

    def _compute(self, pl_module: L.LightningModule, x: Tensor) -> Tensor:
        x_rec = pl_module.decode(_codes(pl_module.encode(self._to_module(x, pl_module)), pl_module))
        if tuple(x_rec.shape) != tuple(x.shape):
            raise ValueError(
                f"{type(pl_module).__name__}.decode(encode(x)) has shape {tuple(x_rec.shape)}, but the "
                f"validation data x has shape {tuple(x.shape)}: the model and the data do not match."
            )
        return x_rec.detach().float().cpu()

    def _draw(self, path: str, x: Tensor, x_rec: Tensor, title: str) -> Tensor:
        x = x.float()
        if x.ndim == 2:  # (N, D) points: the first two coordinates
            return figure_image(reconstruction_figure(x[:, :2], x_rec[:, :2], title), path)
        ncol = min(self.nrow, len(x))
        fill = self.value_range[1] if self.value_range else float(torch.cat([x, x_rec]).max())  # white
        image = image_grid(interleave_rows(x, x_rec, ncol, fill), ncol, self.value_range)
        save_image(image, path)
        return image


class LatentInterpolationCallback(_EncodeDecodeCallback):
    """Every `every_n_epochs` validation epochs, save decoded straight lines between codes of real data.

    Args:
        num_pairs: pairs of held-out images (x_a, x_b), one row each; the first `num_pairs` held-out
            images are the x_a, the next `num_pairs` the x_b, the same ones every epoch.
        steps: points per line, t in linspace(0, 1, steps) (at least 2: the two ends).
        every_n_epochs: draw at the end of every n-th validation epoch (never in the sanity check).
        value_range: range of the data, mapped to [0, 1] for display; None: min-max of the grid.
        seed: seed for the encoder and decoder's randomness (the same draws every epoch).
        num_data_points: for 2-D point data, the held-out points drawn under the paths.

    Needs `pl_module.encode(x)` and `pl_module.decode(z)` (checked at `setup`); codes of any shape
    are interpolated elementwise. Files: `<log_dir>/images/interpolation_epoch=NNNN.png`; logger
    key `interpolation`.
    """

    name = "interpolation"

    def __init__(
        self,
        num_pairs: int = 8,
        steps: int = 10,
        every_n_epochs: int = 1,
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        seed: int = 0,
        num_data_points: int = 512,
    ) -> None:
        if num_pairs < 1 or steps < 2:
            raise ValueError(f"Need num_pairs >= 1 and steps >= 2 (the two ends), got {num_pairs} and {steps}")
        super().__init__(2 * num_pairs, max(2 * num_pairs, num_data_points), every_n_epochs, value_range, seed)
        self.num_pairs = num_pairs
        self.steps = steps
        self.num_data_points = num_data_points

    def _compute(self, pl_module: L.LightningModule, x: Tensor) -> Tensor | None:
        pairs = min(self.num_pairs, len(x) // 2)
        if pairs == 0:
            rank_zero_warn(f"{type(self).__name__} needs at least 2 held-out samples, got {len(x)}.")
            return None
        z = _codes(pl_module.encode(self._to_module(x[: 2 * pairs], pl_module)), pl_module)  # (2P, *code)
        path_codes = interpolate_codes(z[:pairs], z[pairs:], self.steps)  # (P, steps, *code)
        decoded = pl_module.decode(path_codes.flatten(0, 1))  # (P steps, *data)
        if tuple(decoded.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"{type(pl_module).__name__}.decode gives samples of shape {tuple(decoded.shape[1:])}, but "
                f"the validation data have shape {tuple(x.shape[1:])}: the model and the data do not match."
            )
        return decoded.detach().float().cpu().view(pairs, self.steps, *x.shape[1:])

    def _draw(self, path: str, x: Tensor, paths: Tensor, title: str) -> Tensor:
        if x.ndim == 2:  # (N, D) points: the first two coordinates
            return figure_image(interpolation_figure(x[:, :2].float(), paths[..., :2], title), path)
        image = image_grid(paths.flatten(0, 1), self.steps, self.value_range)  # one row per pair
        save_image(image, path)
        return image
