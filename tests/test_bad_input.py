"""Bad input (SPEC 9): every case stops with one clear message naming the problem and the fix,
before work is lost, and `python train.py` prints it without a traceback (exit status 2).

Cases: data that does not fit the model (batches, the CLI's networks, checkpoints of other data),
a latent dimension mismatch when loading weights, unknown divergence / cost / kernel / prior names,
a missing dataset folder, a file passed as a checkpoint that is not one, a callback on a module
that cannot sample, and a non-finite loss (with the optional skipping of critic steps).
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader, TensorDataset

from callbacks import FIDCallback, SampleGridCallback, SinkhornBoundCallback
from cli.checkpoints import CheckpointFileError
from cli.command import TRACEBACK_VARIABLE, cli_main, main
from lightning_modules import NonFiniteError
from lightning_modules.fgan import FGAN
from lightning_modules.primal_dual import PrimalDual
from lightning_modules.wae import WAE
from probes import run_train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "wae_digits.yaml")
TINY = {
    WAE: dict(latent_dim=2, width=8),
    FGAN: dict(latent_dim=2, width=8, critic_width=8),
    PrimalDual: dict(latent_dim=2, width=8, critic_width=8, latent_critic_width=8, mc_samples=64),
}

pytestmark = pytest.mark.usefixtures("in_tmp_dir", "one_thread")  # the configs write runs/ below the working directory


def image_loader(shape=(1, 8, 8), n: int = 32, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=generator) * 2 - 1
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch_size)


def assert_one_message(capsys, *phrases: str) -> str:
    """What `main` printed: one error message with every phrase, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err, err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in:\n{err}"
    return err


# ---- data that does not fit the model ------------------------------------------------------------


@pytest.mark.parametrize("cls", [WAE, FGAN, PrimalDual])
def test_batches_with_other_channels_are_refused_with_both_shapes(cls, quiet_trainer):
    model = cls(data_shape=(1, 8, 8), **TINY[cls])
    with pytest.raises(ValueError, match=r"built for data of shape \(1, 8, 8\).*got a batch of shape \(8, 3, 8, 8\)"):
        quiet_trainer(fast_dev_run=True).fit(model, image_loader(shape=(3, 8, 8)), image_loader(shape=(3, 8, 8)))


def test_cli_refuses_a_decoder_that_does_not_fit_the_images(capsys):
    args = ["fit", "--model", "WAE", "--model.init_args.decoder_channels", "[64,32,16,8,4]", "--data", "DigitsDataModule"]
    assert main(args) == 2
    assert_one_message(capsys, "ValueError: The decoder", "images of shape (1, 8, 8)", "[64, 32, 16, 8, 4]")


def test_cli_refuses_the_paper_encoder_on_8x8_digits(capsys):
    """The MNIST config's four stride-2 convolutions cannot run on 8x8 digits."""
    assert main(["fit", "--config", str(ROOT / "configs" / "wae_mnist_gpu.yaml"), "--data", "DigitsDataModule"]) == 2
    assert_one_message(capsys, "encoder", "(1, 8, 8)", "[128, 256, 512, 1024]")


@pytest.fixture
def checkpoints(tmp_path, quiet_trainer) -> dict[str, Path]:
    """WAE checkpoints: "digits" trained in Python on the digits' shape (1, 8, 8) with latent_dim 8,
    "points" trained through the CLI on 2-D points."""
    model = WAE(data_shape=(1, 8, 8), latent_dim=8, width=8)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, image_loader())
    paths = {"digits": tmp_path / "digits.ckpt", "points": tmp_path / "points.ckpt"}
    trainer.save_checkpoint(paths["digits"])
    cli = cli_main(["fit", "--model", "WAE", "--model.init_args.width", "8", "--data", "GaussianMixtureDataModule",
                    "--data.init_args.num_samples", "64", "--data.init_args.num_val_samples", "16",
                    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                    "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"])
    cli.trainer.save_checkpoint(paths["points"])
    return paths


def test_cli_refuses_a_checkpoint_trained_on_other_data(checkpoints, capsys):
    assert main(["validate", "--config", DIGITS, "--ckpt_path", str(checkpoints["points"])]) == 2
    assert_one_message(capsys, "do not fit this WAE", "data_shape=(2,) in the checkpoint", "data_shape=(1, 8, 8)")


def test_latent_dimension_mismatch_when_loading_weights(checkpoints):
    # (load_from_checkpoint writes the overriding latent_dim into the checkpoint's hyperparameters
    # before the model sees them, so the weights' shapes tell: d_z = 8 rows in the checkpoint, 4 here)
    with pytest.raises(ValueError, match=r"built with latent_dim=4 and data_shape=\(1, 8, 8\): "
                       r"encoder\.head\.weight: \(8, \d+\) in the checkpoint, \(4, \d+\) here"):
        WAE.load_from_checkpoint(checkpoints["digits"], latent_dim=4)
    assert WAE.load_from_checkpoint(checkpoints["digits"]).latent_dim == 8  # the same file loads as trained


# ---- unknown names -----------------------------------------------------------------------------

DIVERGENCES = "kl, reverse_kl, pearson, neyman, hellinger, jensen_shannon, gan, total_variation"


@pytest.mark.parametrize(
    "cls, kwargs, listed",
    [
        (WAE, dict(latent_penalty="f", divergence="kl2"), DIVERGENCES),
        (FGAN, dict(divergence="wasserstein"), DIVERGENCES),
        (PrimalDual, dict(divergence="chi2"), DIVERGENCES),
        (WAE, dict(cost="l3"), "l2, l2sq, l1"),
        (PrimalDual, dict(cost="cosine"), "l2, l2sq, l1"),
        (WAE, dict(kernel="gauss"), "imq, rbf"),
        (WAE, dict(prior="laplace"), "gaussian, sphere, cube"),
        (FGAN, dict(prior="uniform"), "gaussian, sphere, cube"),
        (PrimalDual, dict(prior="student"), "gaussian, sphere, cube"),
    ],
)
def test_unknown_names_list_the_valid_ones(cls, kwargs, listed):
    value = kwargs.get("divergence") or next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"^Unknown \w+ '{value}'\. Valid choices: {listed}\.$"):
        cls(data_shape=(1, 8, 8), **{**TINY[cls], **kwargs})


def test_cli_unknown_divergence_is_one_message(capsys):
    args = ["fit", "--config", DIGITS, "--model.init_args.latent_penalty", "f", "--model.init_args.divergence", "kl2"]
    assert main(args) == 2
    assert_one_message(capsys, "Unknown divergence 'kl2'", DIVERGENCES)


@pytest.mark.parametrize("option, value, choices", [("kernel", "gauss", ("imq", "rbf")), ("prior", "laplace", ("gaussian", "sphere", "cube"))])
def test_cli_unknown_kernel_and_prior_are_refused_when_parsing(capsys, option, value, choices):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DIGITS, f"--model.init_args.{option}", value])
    assert exit_info.value.code == 2  # jsonargparse's usage error: the same status as main's messages
    err = capsys.readouterr().err
    assert value in err and all(choice in err for choice in choices) and "Traceback" not in err


# ---- a missing dataset folder ------------------------------------------------------------------


def test_missing_dataset_folder_is_one_message(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    args = ["fit", "--config", str(ROOT / "configs" / "wae_mnist.yaml"), "--data.init_args.data_dir", str(missing)]
    assert main(args) == 2
    assert_one_message(capsys, "FileNotFoundError: MNIST data not found in", str(missing), "--data.download true")


# ---- a file that is not a checkpoint -----------------------------------------------------------


def bad_checkpoint(kind: str, folder: Path, good: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain_weights":
        torch.save(WAE(data_shape=(1, 8, 8), latent_dim=8, width=8).state_dict(), path)
    elif kind == "folder":
        path.mkdir()
    return path  # "missing": never written


BAD_CHECKPOINTS = {
    "truncated": (CheckpointFileError, r"is a truncated or damaged checkpoint: .*cut short"),
    "random_bytes": (CheckpointFileError, r"is not a checkpoint: torch.save files are zip archives"),
    "empty": (CheckpointFileError, r"is empty \(0 bytes\)"),
    "plain_weights": (CheckpointFileError, r"is a torch file but not a Lightning checkpoint: it has no 'state_dict'"),
    "missing": (FileNotFoundError, r": no such file"),
    "folder": (IsADirectoryError, r"is a folder"),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_file_that_is_not_a_checkpoint_is_named_before_any_work(tmp_path, checkpoints, kind, command):
    path = bad_checkpoint(kind, tmp_path, checkpoints["digits"])
    error, phrase = BAD_CHECKPOINTS[kind]
    with pytest.raises(error, match=rf"--ckpt_path {re.escape(str(path))}.*{phrase}.*Pass a \.ckpt file written by training"):
        cli_main([command, "--config", DIGITS, "--ckpt_path", str(path)])
    assert not (tmp_path / "runs").exists()  # refused before any model, logger or data was built


def test_python_train_py_prints_a_bad_checkpoint_as_one_message(tmp_path):
    """The real `python train.py` entry point: exit status 2, no traceback from torch's unpickler."""
    path = tmp_path / "random.ckpt"
    path.write_bytes(bytes(range(256)) * 8)
    result = run_train(["validate", "--config", DIGITS, "--ckpt_path", str(path)], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and f"--ckpt_path {path} (2048 bytes) is not a checkpoint" in result.stderr


def test_traceback_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["validate", "--config", DIGITS, "--ckpt_path", str(tmp_path / "missing.ckpt")])


# ---- a callback on a module that cannot sample -------------------------------------------------


@pytest.mark.parametrize(
    "callback", [FIDCallback(num_samples=8), SinkhornBoundCallback(num_samples=8), SampleGridCallback(num_samples=4)],
    ids=lambda c: type(c).__name__,
)
def test_callback_on_a_module_without_sample_names_what_is_missing(callback, quiet_trainer):
    trainer = quiet_trainer(fast_dev_run=True, callbacks=[callback])
    with pytest.raises(TypeError, match=rf"{type(callback).__name__} needs the LightningModule to define "
                       r"sample\(num_samples\) -> Tensor; BoringModel does not"):
        trainer.fit(BoringModel())


# ---- non-finite losses -------------------------------------------------------------------------


class NaNDataAt:
    """Mixin: the training batch seen at global step `nan_step` gets a NaN sample."""

    nan_step = -1

    def batch_data(self, batch):
        x = super().batch_data(batch)
        if self.training and self.trainer.global_step == self.nan_step:
            x = x.clone()
            x[0] = math.nan
        return x


class NaNWAE(NaNDataAt, WAE):
    pass


class NaNFGAN(NaNDataAt, FGAN):
    pass


class NaNPrimalDual(NaNDataAt, PrimalDual):
    pass


# steps per batch (one optimiser step each): WAE-MMD 1, FGAN critic + generator 2, primal-dual 3;
# the name of the first loss the NaN sample reaches.
NAN_CASES = {"wae": (NaNWAE, 1, "train/autoencoder_loss"), "fgan": (NaNFGAN, 2, "train/critic_loss"),
             "primal_dual": (NaNPrimalDual, 3, "train/latent_critic_loss")}


@pytest.mark.parametrize("name", NAN_CASES)
def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, name, quiet_trainer):
    cls, steps, loss_name = NAN_CASES[name]
    torch.manual_seed(0)
    model = cls(data_shape=(1, 8, 8), **TINY[cls.__mro__[2]])
    nan_batch = 5  # epoch 1, second batch (4 batches per epoch)
    model.nan_step = nan_batch * steps
    every_batch = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=1, callbacks=[every_batch],
                            enable_checkpointing=True)
    pattern = rf"^step {model.nan_step}: {loss_name} is nan \(epoch 1\)\. Training stopped before this step changed any weight"
    with pytest.raises(NonFiniteError, match=pattern) as error:
        trainer.fit(model, image_loader(), image_loader(n=8))
    assert f"is kept: {tmp_path / 'ckpt' / 'last.ckpt'}" in str(error.value)

    steps_saved = []
    for path in sorted((tmp_path / "ckpt").glob("*.ckpt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()), path.name
        steps_saved.append(state["global_step"])
    assert max(steps_saved) == model.nan_step  # the batch before the NaN one: nothing later was written
    last = cls.__mro__[2].load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert torch.isfinite(last.sample(4)).all()


def test_skipped_critic_steps_are_counted_and_leave_the_optimiser_state_alone(quiet_trainer):
    """FGAN: a NaN in the real data makes one critic loss NaN; the generator does not see real data."""
    torch.manual_seed(0)
    model = NaNFGAN(data_shape=(1, 8, 8), skip_nonfinite_critic_steps=True, **TINY[FGAN])
    model.nan_step = 2 * 5  # epoch 1, second batch
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(model, image_loader(), image_loader(n=8))
    # 8 generator and 8 critic steps called: the skipped one is skipped on the device by the fused Adam,
    # so it counts in trainer.global_step but not in Adam's own step count
    assert trainer.global_step == 2 * 8
    generator_opt, critic_opt = trainer.optimizers
    assert {int(s["step"]) for s in generator_opt.state.values()} == {8}
    assert {int(s["step"]) for s in critic_opt.state.values()} == {7}  # Adam never saw the skipped step
    assert all(torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all() for s in critic_opt.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.callback_metrics["train/skipped_critic_steps"].item() == 1.0  # epoch 1's sum
    assert math.isfinite(trainer.callback_metrics["train/critic_loss_epoch"].item())  # the skipped value is not logged


def test_skipping_in_the_primal_dual_model_leaves_the_data_critic_alone(quiet_trainer):
    model = PrimalDual(data_shape=(1, 8, 8), skip_nonfinite_critic_steps=True, **TINY[PrimalDual])
    critic_loss = model.critic.loss

    def nan_at_step_4(real, fake, gp_weight=0.0):
        loss, objective, grad_norm = critic_loss(real, fake, gp_weight)
        # global step 4: batch 1's data critic step (batch 0 took steps 0-2, batch 1's latent critic step 3)
        return (loss * math.nan if model.trainer.global_step == 4 else loss), objective, grad_norm

    model.critic.loss = nan_at_step_4
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, image_loader(), image_loader(n=8))
    ae_opt, latent_opt, critic_opt = trainer.optimizers
    assert {int(s["step"]) for s in critic_opt.state.values()} == {2}  # batch 1's data critic step skipped
    assert {int(s["step"]) for s in latent_opt.state.values()} == {3} and trainer.global_step == 9
    assert trainer.callback_metrics["train/skipped_critic_steps"].item() == 1.0


def test_skipping_is_off_by_default(quiet_trainer):
    torch.manual_seed(0)
    model = NaNFGAN(data_shape=(1, 8, 8), **TINY[FGAN])
    model.nan_step = 2
    with pytest.raises(NonFiniteError, match="or set skip_nonfinite_critic_steps: true"):
        quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(model, image_loader())


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path, quiet_trainer):
    model = WAE(data_shape=(1, 8, 8), **TINY[WAE])
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, image_loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.decoder.parameters())[0] = math.inf
    with pytest.raises(NonFiniteError, match=r"not writing a checkpoint, the weights decoder\.\S+ are not finite"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before


def test_main_prints_a_nonfinite_loss_as_one_message(monkeypatch, capsys):
    def stopped(args=None):
        raise NonFiniteError("step 1234: train/critic_loss is nan (epoch 3). Training stopped before ...")

    # (the module where `main` looks cli_main up)
    monkeypatch.setattr(importlib.import_module("cli.command"), "cli_main", stopped)
    assert main([]) == 2
    assert_one_message(capsys, "NonFiniteError: step 1234: train/critic_loss is nan")


def test_a_checkpoint_of_another_model_class_is_named(tmp_path, capsys, quiet_trainer):
    """An FGAN checkpoint with the WAE config: the message names both classes (Lightning alone would
    build the FGAN and fail in a callback that needs an encoder, naming neither)."""
    model = FGAN(data_shape=(1, 8, 8), **TINY[FGAN])
    model.hparams["_class_path"] = "lightning_modules.fgan.FGAN"  # what the CLI records
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, image_loader())
    path = tmp_path / "fgan.ckpt"
    trainer.save_checkpoint(path)
    assert main(["fit", "--config", DIGITS, "--ckpt_path", str(path)]) == 2
    assert_one_message(capsys, f"--ckpt_path {path} holds a FGAN", "but the config builds a WAE")
