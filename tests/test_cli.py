"""The command line (cli.command, run by `python train.py` and the installed `primal-dual`): help,
configs, fit / validate / test, and bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from cli.command import cli_main, main
from helpers import write_mnist

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "wae_digits.yaml")
QUICK = ["--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "1"]

pytestmark = pytest.mark.usefixtures("in_tmp_dir", "one_thread")  # the configs write runs/ below the working directory


def test_train_py_is_the_cli():
    import train

    assert train.cli_main is cli_main is cli.cli_main
    assert train.main is main is cli.main  # `cli:main`, the console command's entry point


def test_console_command_prints_the_help(tmp_path):
    """`primal-dual --help`, the script pyproject's [project.scripts] installs next to the interpreter."""
    beside = Path(sys.executable).parent / "primal-dual"
    script = str(beside) if beside.is_file() else shutil.which("primal-dual")
    if script is None:
        pytest.skip("the primal-dual console script is not installed here (pip install -e . installs it)")
    result = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fit" in result.stdout and "validate" in result.stdout


def test_help_lists_model_and_data_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out and "--trainer.max_epochs" in out


def test_print_config_shows_the_offline_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", DIGITS, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "datamodules.DigitsDataModule" in out and "latent_penalty: mmd" in out


def test_fit_validate_test_leave_checkpoint_images_and_summary(tmp_path, capsys):
    cli_main(["fit", "--config", DIGITS, "--trainer.max_epochs", "5", "--trainer.limit_train_batches", "2", *QUICK])
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "wae_digits" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert (run_dir / "images" / "samples_epoch=0004.png").is_file()
    assert "fit finished: epoch 5" in out and "val/recon" in out and "last.ckpt" in out and "images" in out

    for command in ("validate", "test"):
        cli_main([command, "--config", DIGITS, "--ckpt_path", str(last), *QUICK])
        out = capsys.readouterr().out
        assert f"{command} finished" in out and f"{'val' if command == 'validate' else 'test'}/primal" in out


def test_short_class_names_and_data_shape_link():
    cli = cli_main(["fit", "--model", "WAE", "--data", "GaussianMixtureDataModule", "--trainer.fast_dev_run", "true"])
    assert cli.model.data_shape == (2,)
    assert cli.trainer.state.finished


@pytest.mark.parametrize(
    "config, shape, decoder_channels",
    [("wae_mnist_gpu.yaml", (1, 28, 28), [1024, 512, 256]), ("wae_celeba.yaml", (3, 64, 64), [1024, 512, 256, 128])],
)
def test_paper_configs_build_the_paper_networks(config, shape, decoder_channels):
    cli = cli_main(["--config", str(ROOT / "configs" / config)], run=False)
    assert cli.model.data_shape == shape
    assert cli.model.hparams.decoder_channels == decoder_channels
    assert cli.model.hparams.encoder_channels == [128, 256, 512, 1024]


LAPTOP_MNIST = ["wae_mnist.yaml", "fgan_mnist.yaml", "primal_dual_mnist.yaml", "sinkhorn_mnist.yaml"]


def test_every_model_has_a_laptop_and_a_gpu_mnist_config():
    found = sorted(p.name for p in (ROOT / "configs").glob("*_mnist*.yaml"))
    assert found == sorted(LAPTOP_MNIST + [name.replace(".yaml", "_gpu.yaml") for name in LAPTOP_MNIST])


@pytest.mark.parametrize("config", LAPTOP_MNIST)
def test_laptop_mnist_configs_train_and_validate_with_their_callbacks(config, tmp_path):
    """One batch and one validation with every callback of the file, on small MNIST idx files; the
    file caps training at 10 minutes and builds the GPU version's model class."""
    import yaml

    write_mnist(tmp_path, "MNIST", n_train=200, n_test=20)
    args = ["fit", "--config", str(ROOT / "configs" / config), "--data.init_args.data_dir", str(tmp_path),
            "--data.init_args.batch_size", "8", "--trainer.fast_dev_run", "true", "--trainer.enable_model_summary", "false"]
    cli = cli_main(args)
    assert cli.trainer.state.finished and cli.model.data_shape == (1, 28, 28)
    assert cli.model.sample(2).shape == (2, 1, 28, 28)
    settings = yaml.safe_load((ROOT / "configs" / config).read_text())
    assert settings["trainer"]["max_time"] == "00:00:10:00"
    gpu = yaml.safe_load((ROOT / "configs" / config.replace(".yaml", "_gpu.yaml")).read_text())
    assert gpu["model"]["class_path"] == settings["model"]["class_path"]
    assert "max_time" not in gpu["trainer"] and gpu["trainer"]["max_epochs"] >= 25


def test_missing_dataset_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    args = ["fit", "--config", str(ROOT / "configs" / "wae_mnist.yaml"), "--data.init_args.data_dir", str(missing)]
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*--data.download true"):
        cli_main(args)


def test_unknown_divergence_lists_the_known_ones():
    args = ["--config", DIGITS, "--model.init_args.latent_penalty", "f", "--model.init_args.divergence", "kl2"]
    with pytest.raises(ValueError, match="kl, reverse_kl, pearson"):
        cli_main(args, run=False)


def test_unknown_cost_is_refused_at_parse_time_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--config", DIGITS, "--model.init_args.cost", "l3"], run=False)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "l3" in err and "l2sq" in err


# ---- the f-GAN configs -------------------------------------------------------------------------

FGAN_DIGITS = str(ROOT / "configs" / "fgan_digits.yaml")


def test_fgan_digits_config_writes_samples_and_checkpoints(tmp_path, capsys):
    from lightning_modules.fgan import FGAN

    out = tmp_path / "out"
    cli_main(["fit", "--config", FGAN_DIGITS, "--trainer.max_epochs", "5", "--trainer.limit_train_batches", "2",
              "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *QUICK])
    assert "fit finished: epoch 5" in capsys.readouterr().out
    run_dir = out / "fgan_digits" / "version_0"
    assert (run_dir / "images" / "samples_epoch=0004.png").is_file()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and "epoch=4-step=20.ckpt" in checkpoints  # 2 optimisers x 2 batches x 5
    model = FGAN.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert model.hparams.divergence == "jensen_shannon" and model.sample(3).shape == (3, 1, 8, 8)
    assert not (tmp_path / "runs").exists()  # everything went where it was sent


def test_fgan_gaussians_config_logs_mode_coverage():
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "fgan_gaussians.yaml"), "--trainer.fast_dev_run", "true"])
    assert cli.model.data_shape == (2,) and cli.datamodule.std == 0.02
    metrics = cli.trainer.callback_metrics
    assert 0 <= metrics["val/modes_covered"].item() <= 8 and 0 <= metrics["val/high_quality_fraction"].item() <= 1


@pytest.mark.parametrize(
    "config, shape, generator_channels, critic_channels",
    [("fgan_mnist_gpu.yaml", (1, 28, 28), [256, 128, 64], [64, 128, 256]),
     ("fgan_celeba.yaml", (3, 64, 64), [1024, 512, 256, 128, 64], [64, 128, 256, 512])],
)
def test_fgan_paper_configs_build_dcgan_networks(config, shape, generator_channels, critic_channels):
    import torch

    cli = cli_main(["--config", str(ROOT / "configs" / config)], run=False)
    model = cli.model
    assert model.data_shape == shape and model.latent_dim == 100 and model.hparams.prior == "cube"
    assert model.hparams.lr == model.hparams.critic_lr == 2e-4 and tuple(model.hparams.betas) == (0.5, 0.999)
    assert cli.datamodule.batch_size == 128
    convs = [m.out_channels for m in model.critic.modules() if isinstance(m, torch.nn.Conv2d)]
    transposed = [m.out_channels for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    projection = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.Unflatten)).unflattened_size
    assert convs == critic_channels and transposed == generator_channels[1:]
    assert tuple(projection) == (generator_channels[0], shape[1] // 2 ** len(transposed), shape[2] // 2 ** len(transposed))
    samples = model.sample(2)
    assert samples.shape == (2, *shape) and samples.abs().max() <= 1
    assert model.critic(samples).shape == (2,)


def test_outputs_follow_the_default_root_dir_or_a_logger_save_dir(tmp_path, monkeypatch):
    """The configs' logger has no save_dir of its own: logs, checkpoints and images go under
    --trainer.default_root_dir, or under the logger's save_dir when one is given."""
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    quick = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--model.init_args.width", "8"]
    config = str(ROOT / "configs" / "wae_digits.yaml")
    chosen = cli_main(["fit", "--config", config, *quick, "--trainer.default_root_dir", str(tmp_path / "chosen")])
    assert Path(chosen.trainer.log_dir) == tmp_path / "chosen" / "wae_digits" / "version_0"
    assert Path(chosen.trainer.checkpoint_callback.last_model_path).is_relative_to(tmp_path / "chosen")
    logger_dir = cli_main(["fit", "--config", config, *quick, "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert Path(logger_dir.trainer.log_dir) == tmp_path / "logs" / "wae_digits" / "version_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen", "logs"]
