"""Image callbacks: reconstruction grids and latent interpolations checked pixel by pixel against
grids built independently from known encode/decode maps, the encode/decode protocol, the
schedule, 2-D scatter plots, loggers (image-taking, CSV, TensorBoard, failing), and that the
callbacks leave the training RNG and the module's train/eval flags as they found them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.collections import LineCollection
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import make_grid

import callbacks.reconstruction as reconstruction
from callbacks.base import frozen_eval
from callbacks.images import SampleGridCallback
from callbacks.reconstruction import (
    LatentInterpolationCallback,
    ReconstructionGridCallback,
    interpolate_codes,
    interpolation_figure,
    reconstruction_figure,
)
from cli.command import cli_main
from helpers import ImageLogger, TrivialModule

ROOT = Path(__file__).resolve().parents[1]
UPSCALE = 4  # image_grid enlarges 8x8 images to 32x32 (min_side=32)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a module with known maps and a quiet fit -----------------------------------------------------


class NegatingAE(TrivialModule):
    """encode(x) = x / 2 (flattened), decode(z) = -2 z: decode(encode(x)) = -x, and the decoded
    line between codes of x_a and x_b is -((1 - t) x_a + t x_b). `noise` > 0 adds noise * N(0, I)
    to the codes (a stochastic encoder). Records (training, grad enabled) at every encode call."""

    def __init__(self, shape=(1, 8, 8), noise: float = 0.0) -> None:
        super().__init__()
        self.shape, self.noise = tuple(shape), noise
        self.calls: list[tuple[bool, bool]] = []

    def encode(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        z = x.flatten(1) / 2
        return z + self.noise * torch.randn_like(z)

    def decode(self, z):
        return (-2 * z).view(len(z), *self.shape)

    def sample(self, num_samples):
        return self.decode(torch.rand(num_samples, int(np.prod(self.shape))) - 0.5)


class SampleOnly(NegatingAE):
    """Has `sample` but neither `encode` nor `decode`."""

    encode = None
    decode = None

    def sample(self, num_samples):
        return torch.zeros(num_samples, *self.shape)


class TupleEncoder(NegatingAE):
    def encode(self, x):
        return x.flatten(1), x.flatten(1)  # (mean, log variance), VAE-style


@pytest.fixture
def fit(quiet_trainer, tmp_path):
    """`fit(model, callbacks, val_data, max_epochs=1, logger=False, shuffle=False, **overrides)`: one
    training batch per epoch, validation batches of 4 from `val_data`, files below tmp_path."""

    def run(model, callbacks, val_data, max_epochs=1, logger=False, shuffle=False, **kwargs) -> L.Trainer:
        trainer = quiet_trainer(logger=logger, max_epochs=max_epochs, limit_train_batches=1, default_root_dir=tmp_path,
                                callbacks=callbacks, **kwargs)
        train = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)
        trainer.fit(model, train, DataLoader(val_data, batch_size=4, shuffle=shuffle))
        return trainer

    return run


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (n, 1, 8, 8) in [-1, 1]


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)  # (H, W, 3)


def expected_png(tiles: torch.Tensor, nrow: int) -> np.ndarray:
    """What save_image writes for (N, 1, 8, 8) tiles in [-1, 1]: enlarged by UPSCALE by pixel
    repetition, torchvision's make_grid, then [0, 1] -> uint8 as save_image rounds."""
    big = tiles.double().repeat_interleave(UPSCALE, -1).repeat_interleave(UPSCALE, -2)
    grid = make_grid(big, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)  # (3, H, W)
    return (grid * 255 + 0.5).clamp(0, 255).floor().permute(1, 2, 0).numpy().astype(np.int64)


def tile(array: np.ndarray, row: int, col: int, side: int = 8 * UPSCALE, padding: int = 2) -> np.ndarray:
    top, left = padding + row * (side + padding), padding + col * (side + padding)
    return array[top : top + side, left : left + side]


# ---- the pictures, pixel by pixel --------------------------------------------------------------


def test_reconstruction_grid_alternates_originals_and_reconstructions(tmp_path, fit):
    x = images(10)
    callback = ReconstructionGridCallback(num_images=10, nrow=4)
    fit(NegatingAE(), [callback], TensorDataset(x, torch.zeros(10)))  # (x, y) batches
    assert callback.last_path == str(tmp_path / "images" / "reconstructions_epoch=0000.png")

    white = torch.ones(2, 1, 8, 8)  # the short last row is padded with blank tiles
    rows = [x[0:4], -x[0:4], x[4:8], -x[4:8], torch.cat([x[8:10], white]), torch.cat([-x[8:10], white])]
    expected = expected_png(torch.cat(rows), nrow=4)
    got = read_png(callback.last_path)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1  # float32 model vs float64 reference: one grey level
    # and the picture can tell a wrong reconstruction: decode(encode(x)) = x would differ a lot
    identity = expected_png(torch.cat([x[0:4], x[0:4], x[4:8], x[4:8], rows[4], rows[4]]), nrow=4)
    assert np.abs(got - identity).max() > 100


def test_interpolation_grid_is_the_decoded_straight_line(tmp_path, fit):
    x = images(8, seed=1)
    pairs, steps = 3, 5
    callback = LatentInterpolationCallback(num_pairs=pairs, steps=steps)
    model = NegatingAE()
    fit(model, [callback], x)  # plain tensor batches
    got = read_png(tmp_path / "images" / "interpolation_epoch=0000.png")

    x_a, x_b = x[:pairs].double(), x[pairs : 2 * pairs].double()
    t = torch.linspace(0, 1, steps, dtype=torch.float64).view(1, steps, 1, 1, 1)
    lines = -((1 - t) * x_a.unsqueeze(1) + t * x_b.unsqueeze(1))  # (P, steps, 1, 8, 8)
    assert np.abs(got - expected_png(lines.flatten(0, 1), nrow=steps)).max() <= 1

    midpoint = model.decode((model.encode(x_a) + model.encode(x_b)) / 2)  # t = 0.5: column 2
    for p in range(pairs):
        grey = ((midpoint[p, 0] + 1) / 2 * 255).repeat_interleave(UPSCALE, -1).repeat_interleave(UPSCALE, -2)
        assert np.abs(tile(got, p, steps // 2) - grey.numpy()[..., None]).max() <= 1
    assert np.abs(tile(got, 0, 0) - tile(got, 0, steps - 1)).max() > 50  # the ends differ


def test_interpolate_codes_exact_ends_and_linear():
    z_a, z_b = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    path = interpolate_codes(z_a, z_b, 4)  # codes of any shape: (3, 4 steps, 2, 4)
    assert path.shape == (3, 4, 2, 4)
    assert torch.equal(path[:, 0], z_a) and torch.equal(path[:, -1], z_b)
    torch.testing.assert_close(path[:, 1], z_a + (z_b - z_a) / 3, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        interpolate_codes(z_a, z_b[:2], 4)


def test_held_out_images_are_fixed_for_the_whole_run(tmp_path, fit):
    x = images(32, seed=2)
    callback = ReconstructionGridCallback(num_images=4, nrow=4)
    torch.manual_seed(0)
    fit(NegatingAE(), [callback], x, max_epochs=3, shuffle=True)  # other batches each epoch
    first, last = (read_png(tmp_path / "images" / f"reconstructions_epoch={e:04d}.png") for e in (0, 2))
    assert np.array_equal(first, last)
    held_out = callback.held_out
    assert held_out.shape == (4, 1, 8, 8)
    assert any(torch.equal(held_out[0], row) for row in x)


def test_a_small_validation_set_is_not_topped_up_in_later_epochs(tmp_path, fit):
    x = images(6, seed=3)
    callback = ReconstructionGridCallback(num_images=8, nrow=4)
    fit(NegatingAE(), [callback], x, max_epochs=3)
    assert torch.equal(callback.held_out, x)  # all 6, once: not 8 with repeats from epoch 1
    first, last = (read_png(tmp_path / "images" / f"reconstructions_epoch={e:04d}.png") for e in (0, 2))
    assert np.array_equal(first, last)


# ---- protocol, schedule, loggers ----------------------------------------------------------------


@pytest.mark.parametrize("callback_class", [ReconstructionGridCallback, LatentInterpolationCallback])
def test_module_without_encode_decode_gets_a_type_error_at_setup(callback_class, fit):
    with pytest.raises(TypeError, match=r"encode\(x\) -> Tensor, decode\(z\) -> Tensor.*SampleOnly does not"):
        fit(SampleOnly(), [callback_class()], images(4))


def test_encode_returning_a_tuple_is_named(fit):
    with pytest.raises(TypeError, match="encode\\(x\\) must return one Tensor of codes, got tuple"):
        fit(TupleEncoder(), [ReconstructionGridCallback(num_images=4)], images(4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_images=0), "num_images"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(nrow=0), "nrow"),
        (dict(value_range=(1.0, -1.0)), "low < high"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconstructionGridCallback(**kwargs)


def test_interpolation_needs_two_steps():
    with pytest.raises(ValueError, match="steps >= 2"):
        LatentInterpolationCallback(steps=1)


@pytest.mark.parametrize("every_n_epochs, max_epochs, due", [(1, 2, [0, 1]), (2, 5, [1, 3])])
def test_files_once_per_due_epoch_and_nothing_in_the_sanity_check(tmp_path, every_n_epochs, max_epochs, due, fit):
    logger = ImageLogger(tmp_path)
    cbs = [
        ReconstructionGridCallback(num_images=4, every_n_epochs=every_n_epochs),
        LatentInterpolationCallback(num_pairs=2, steps=3, every_n_epochs=every_n_epochs),
        SampleGridCallback(num_samples=4, every_n_epochs=every_n_epochs),
    ]
    fit(NegatingAE(), cbs, images(8), max_epochs=max_epochs, logger=logger, num_sanity_val_steps=2)
    names = {f"{stem}_epoch={e:04d}.png" for stem in ("reconstructions", "interpolation", "samples") for e in due}
    assert set(p.name for p in (tmp_path / "images").iterdir()) == names
    # one image per due epoch and key: a sanity-check picture would be one more call
    assert sorted(key for key, _, _ in logger.images) == sorted(["reconstructions", "interpolation", "samples"] * len(due))

    for key, image, step in logger.images:  # the logger gets the picture of the PNG file
        assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1 and step >= 1
    key, image, _ = logger.images[-3]
    png = read_png(tmp_path / "images" / f"{key}_epoch={due[-1]:04d}.png")
    assert np.array_equal(png, (image * 255 + 0.5).clamp(0, 255).floor().permute(1, 2, 0).numpy().astype(np.int64))


def test_csv_tensorboard_and_a_failing_logger(tmp_path, fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv, tensorboard = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    callback = ReconstructionGridCallback(num_images=4)
    with pytest.warns(UserWarning, match="ImageLogger could not log the image 'reconstructions'.*image service down"):
        trainer = fit(NegatingAE(), [callback], images(4), max_epochs=2,
                      logger=[csv, tensorboard, ImageLogger(tmp_path, fail=True)])
    assert trainer.state.finished and trainer.current_epoch == 2
    assert (Path(csv.log_dir) / "images" / "reconstructions_epoch=0001.png").is_file()  # the CSV run's record
    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    assert [e.step for e in events.Images("reconstructions")] == [1, 2]


# ---- randomness and modes -------------------------------------------------------------------------


def test_callbacks_leave_rng_and_modes_alone_and_repeat_a_stochastic_encoder(fit):
    model = NegatingAE(noise=0.3)
    cbs = [ReconstructionGridCallback(num_images=4), LatentInterpolationCallback(num_pairs=2, steps=3)]
    trainer = fit(model, cbs, images(8))
    assert model.calls and all(call == (False, False) for call in model.calls)  # eval mode, no grad
    model.train()
    model.layer.eval()  # a submodule frozen in eval mode must stay so
    for callback in cbs:
        callback.on_validation_epoch_end(trainer, model)
        first = read_png(callback.last_path)
        torch.randn(100)  # training moves on: an unseeded encoder would now draw other noise
        state = torch.get_rng_state()
        callback.on_validation_epoch_end(trainer, model)
        assert torch.equal(torch.get_rng_state(), state)
        assert model.training and not model.layer.training
        assert np.array_equal(read_png(callback.last_path), first)
    assert model.calls[-1] == (False, False)


def test_frozen_eval_restores_each_submodule_and_the_rng():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    net[2].eval()
    state = torch.get_rng_state()
    with frozen_eval(net, seed=3):
        assert not any(m.training for m in net.modules()) and not torch.is_grad_enabled()
        a = torch.rand(5)
    with frozen_eval(net, seed=3):
        b = torch.rand(5)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in net.modules()] == [True, True, True, False]


# ---- 2-D points ----------------------------------------------------------------------------------


def test_points_get_scatter_plots_of_the_right_data(tmp_path, monkeypatch, fit):
    points = torch.randn(40, 2, generator=torch.Generator().manual_seed(4))
    seen = {}
    for name in ("reconstruction_figure", "interpolation_figure"):
        original = getattr(reconstruction, name)

        def spy(*args, _name=name, _original=original):
            seen[_name] = args
            return _original(*args)

        monkeypatch.setattr(reconstruction, name, spy)
    logger = ImageLogger(tmp_path)
    cbs = [ReconstructionGridCallback(num_images=16), LatentInterpolationCallback(num_pairs=3, steps=4, num_data_points=30)]
    fit(NegatingAE(shape=(2,)), cbs, points, logger=logger)

    for stem in ("reconstructions", "interpolation"):
        with Image.open(tmp_path / "images" / f"{stem}_epoch=0000.png") as png:
            assert png.format == "PNG" and png.size == (400, 400)
    assert [image.shape for _, image, _ in logger.images] == [(3, 400, 400)] * 2

    shown, rec, _ = seen["reconstruction_figure"]
    torch.testing.assert_close(shown, points[:16])
    torch.testing.assert_close(rec, -points[:16])
    data, paths, _ = seen["interpolation_figure"]
    torch.testing.assert_close(data, points[:30])  # num_data_points held-out points under the paths
    t = torch.linspace(0, 1, 4).view(1, 4, 1)
    torch.testing.assert_close(paths, -((1 - t) * points[:3, None] + t * points[3:6, None]))


def test_figures_draw_the_segments_and_paths_they_are_given():
    points, rec = torch.randn(5, 2), torch.randn(5, 2)
    fig = reconstruction_figure(points, rec, "t")
    (segments,) = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert np.allclose(np.stack(segments.get_segments()), torch.stack([points, rec], 1).numpy())

    paths = torch.randn(3, 6, 2)
    fig = interpolation_figure(torch.randn(10, 2), paths, "t")
    drawn = [line.get_xydata() for line in fig.axes[0].lines]
    assert len(drawn) == 3 and all(np.allclose(d, p.numpy()) for d, p in zip(drawn, paths))


# ---- from the command line, on the project's WAE -------------------------------------------------


@pytest.mark.parametrize("data", ["DigitsDataModule", "GaussianMixtureDataModule"])  # images, 2-D points
@pytest.mark.usefixtures("in_tmp_dir")
def test_cli_config_with_a_real_wae(tmp_path, data):
    # limits of 2, not 1: the CLI reads limit_*_batches 1 as the float 1.0, i.e. all batches
    config = tmp_path / "callbacks.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: callbacks.reconstruction.ReconstructionGridCallback\n"
        "      init_args: {num_images: 16, nrow: 4, value_range: [-1.0, 1.0], seed: 1}\n"
        "    - class_path: callbacks.reconstruction.LatentInterpolationCallback\n"
        "      init_args: {num_pairs: 2, steps: 4, value_range: null}\n"
    )
    args = ["fit", "--model", "WAE", "--model.width", "8", "--data", data, "--config", str(config),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.accelerator", "cpu"]
    cli = cli_main(args)
    recon, interp = [c for c in cli.trainer.callbacks if isinstance(c, (ReconstructionGridCallback, LatentInterpolationCallback))]
    assert (recon.num_images, recon.nrow, recon.value_range, interp.steps, interp.value_range) == (16, 4, (-1.0, 1.0), 4, None)
    folder = Path(cli.trainer.log_dir) / "images"
    assert {p.name for p in folder.iterdir()} == {"reconstructions_epoch=0000.png", "interpolation_epoch=0000.png"}


# ---- two DDP processes (gloo on CPU) -----------------------------------------------------------

DDP_SCRIPT = """
import lightning as L, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.loggers import CSVLogger
from callbacks.images import SampleGridCallback
from callbacks.reconstruction import LatentInterpolationCallback, ReconstructionGridCallback

class AE(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
    def encode(self, x): return x.flatten(1) / 2
    def decode(self, z): return (-2 * z).view(len(z), 1, 8, 8)
    def sample(self, n): return torch.zeros(n, 1, 8, 8)
    def training_step(self, batch, batch_idx): return self.layer(torch.ones(1, 2)).sum()
    def validation_step(self, batch, batch_idx): pass
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    callbacks = [SampleGridCallback(num_samples=4), ReconstructionGridCallback(num_images=4),
                 LatentInterpolationCallback(num_pairs=2, steps=3)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=1,
                        logger=CSVLogger({out!r}), callbacks=callbacks, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(AE(), DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2),
                DataLoader(torch.rand(8, 1, 8, 8), batch_size=2))
    open(f"{out}/finished_rank_{{trainer.global_rank}}", "w").close()
    torch.distributed.destroy_process_group()  # as train.main does: a gloo group left to exit can abort
"""


def test_two_ddp_processes_finish_and_rank_zero_writes(tmp_path):
    """trainer.log_dir broadcasts: called on rank zero only, rank zero waits for a rank that has
    moved on (the SampleGridCallback of before did so and crashed or hung under DDP)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(out=str(tmp_path / "logs"))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        out, _ = proc.communicate()
        pytest.fail(f"DDP run did not finish in 180 s (a collective inside a rank-zero branch?):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "logs" / "finished_rank_0").is_file() and (tmp_path / "logs" / "finished_rank_1").is_file()
    folder = tmp_path / "logs" / "lightning_logs" / "version_0" / "images"
    stems = ("samples", "reconstructions", "interpolation")
    assert {p.name for p in folder.iterdir()} == {f"{s}_epoch={e:04d}.png" for s in stems for e in (0, 1)}
