"""Resume without loss (SPEC 8-9): a run killed with SIGKILL in the middle of an epoch resumes with
`--ckpt_path last` and ends with the same metrics as an uninterrupted run; checkpoint writes are
atomic, so a crash during a save leaves the previous checkpoint usable.

The runs are `python train.py` subprocesses (tests/probes.py) on the digits configs, on CPU with
`--trainer.deterministic true`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cli.checkpoints import AtomicCheckpointIO, newest_last_checkpoint
from cli.command import cli_main
from probes import ROOT, run_train

TINY = [
    "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2", "--trainer.check_val_every_n_epoch", "1",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.deterministic", "true",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # the runs in this process (the subprocesses take OMP_NUM_THREADS=1)


def fit_args(config: str, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / config), "--trainer.max_epochs", str(epochs), *TINY,
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks+=probes.MetricsProbe", f"--trainer.callbacks.out_dir={out / 'probe'}", *extra,
    ]


def read_probe(out: Path) -> dict:
    return json.loads((out / "probe" / "rank0.json").read_text())


def check_ok(result) -> None:
    assert result.returncode == 0, f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


# WAE-MMD: one optimiser step per batch, 4 per epoch; killed at step 10 (epoch 2, batch 3 of 4),
# so last.ckpt is the end of epoch 1 (step 8).
# FGAN: generator and critic steps, 8 per epoch; killed at step 20 (epoch 2, batch 3 of 4), last.ckpt at step 16.
CASES = {
    "wae": ("wae_digits.yaml", 10, 8, []),
    "fgan": ("fgan_digits.yaml", 20, 16, ["--model.init_args.lipschitz", "spectral_norm"]),
}


@pytest.mark.parametrize("name", CASES)
def test_sigkill_mid_epoch_then_resume_last_matches_an_uninterrupted_run(tmp_path, name):
    config, kill_step, saved_step, extra = CASES[name]
    epochs = 3
    reference = tmp_path / "uninterrupted"
    check_ok(run_train(fit_args(config, reference, epochs, *extra), cwd=tmp_path))

    crashed = tmp_path / "crashed"
    kill = ["--trainer.callbacks+=probes.KillAtStep", f"--trainer.callbacks.step={kill_step}"]
    killed = run_train(fit_args(config, crashed, epochs, *extra, *kill), cwd=tmp_path)
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}:\n{killed.stderr[-3000:]}"
    run_name = config.removesuffix(".yaml")
    checkpoints = crashed / run_name / "version_0" / "checkpoints"
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == saved_step and state["epoch"] == 1
    expected_optimizers = 1 if name == "wae" else 2  # WAE-MMD: autoencoder; FGAN: generator and critic
    assert len(state["optimizer_states"]) == expected_optimizers
    for optimizer_state in state["optimizer_states"]:  # Adam moments saved with every parameter's step count
        assert all(s["step"] > 0 for s in optimizer_state["state"].values())
    assert "rng_states" in state and "loops" in state

    resumed = run_train(fit_args(config, crashed, epochs, *extra, "--ckpt_path", "last"), cwd=tmp_path)
    check_ok(resumed)
    assert f"--ckpt_path last: {checkpoints / 'last.ckpt'}" in resumed.stderr + resumed.stdout
    assert sorted(p.name for p in (crashed / run_name).iterdir()) == ["version_0"]  # logging continued there

    expected, got = read_probe(reference), read_probe(crashed)
    assert got["start_step"] == saved_step and got["global_step"] == expected["global_step"]
    assert [e["epoch"] for e in got["epochs"]] == [2]
    assert got["parameters"] == expected["parameters"], "the resumed run ended with other weights"
    final_expected, final_got = expected["final_metrics"], got["final_metrics"]
    assert set(final_got) == set(final_expected)
    for key in final_expected:
        if not key.endswith("_step"):
            assert final_got[key] == pytest.approx(final_expected[key], rel=1e-6, abs=1e-9), key


def test_ckpt_path_last_with_nothing_to_resume(tmp_path):
    """fit starts from scratch (a requeued job may always pass `last`); validate stops with a message."""
    out = tmp_path / "out"
    args = ["--config", str(ROOT / "configs" / "wae_digits.yaml"), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.default_root_dir", str(out), "--ckpt_path", "last"]
    with pytest.raises(FileNotFoundError, match=r"no last.ckpt under .*wae_digits/version_\*/checkpoints to validate"):
        cli_main(["validate", *args])
    cli = cli_main(["fit", *args, "--trainer.fast_dev_run", "true"])
    assert cli.config.fit.ckpt_path is None and cli.trainer.state.finished


def test_newest_last_checkpoint_is_the_most_recently_written_one(tmp_path):
    def save(version: str, name: str = "last.ckpt", age: float = 0.0) -> Path:
        folder = tmp_path / version / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (1e9 - age, 1e9 - age))
        return folder / name

    assert newest_last_checkpoint(tmp_path) is None
    save("version_0", age=100)
    newest = save("version_3", age=50)
    save("version_7", name=".last.ckpt.tmp-123")  # a crashed write: not a checkpoint
    save("version_8", name="epoch=1-step=8.ckpt")  # not a last checkpoint
    save("version_x")  # not a logger version folder
    assert newest_last_checkpoint(tmp_path) == (newest, 3)


# ---- atomic checkpoint writes -------------------------------------------------------------------


def first_checkpoint(path: Path) -> bytes:
    TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "epoch": 0}, path)
    return path.read_bytes()


def assert_previous_intact(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 0


def test_lightning_default_save_keeps_the_previous_file_when_the_write_fails(tmp_path, monkeypatch):
    """Lightning's claim, checked: `_atomic_save` writes through an fsspec transaction (a temporary
    file in the system temp folder, then a move), so a write that fails halfway leaves the old file."""
    import fsspec.implementations.local as local

    path = tmp_path / "last.ckpt"
    before = first_checkpoint(path)
    real_write = local.LocalFileOpener.write

    def half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5000.0)}, "epoch": 1}, path)
    assert_previous_intact(path, before)


def test_lightning_default_loses_the_previous_file_when_tmp_is_another_filesystem(tmp_path, monkeypatch):
    """...but only when the system temp folder and the checkpoint share a filesystem: otherwise the
    move is a copy into the truncated target (os.rename fails with EXDEV), and a crash during that
    copy destroys the previous checkpoint. This is why the CLI installs `AtomicCheckpointIO`.
    (If this starts failing, fsspec moves atomically across filesystems and the plugin may go.)"""
    path = tmp_path / "last.ckpt"
    before = first_checkpoint(path)
    real_rename = os.rename

    def cross_device(src, dst, *args, **kwargs):
        if str(dst) == str(path):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    def copy_dies_halfway(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError("killed during the copy")

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(shutil, "copyfile", copy_dies_halfway)
    with pytest.raises(OSError, match="killed during the copy"):
        TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5000.0)}, "epoch": 1}, path)
    assert path.read_bytes() != before
    with pytest.raises((RuntimeError, OSError)):  # torch cannot read the half-copied file
        torch.load(path, weights_only=True)


def test_atomic_checkpoint_io_keeps_the_previous_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    before = first_checkpoint(path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5000.0)}, "epoch": 1}, path)
    assert_previous_intact(path, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone
    monkeypatch.setattr(torch, "save", real_save)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5.0)}, "epoch": 1}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_cli_writes_through_atomic_checkpoint_io(tmp_path):
    cli = cli_main(["--config", str(ROOT / "configs" / "wae_digits.yaml"), "--trainer.default_root_dir",
                    str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    """A real crash during a save: the process dies with half of last.ckpt written. The previous
    last.ckpt loads; the half-written temporary file is removed by the next save."""
    out = tmp_path / "out"
    kill = ["--trainer.callbacks+=probes.KillDuringCheckpointWrite", "--trainer.callbacks.write=2"]
    killed = run_train(fit_args("wae_digits.yaml", out, 3, *kill), cwd=tmp_path)
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}:\n{killed.stderr[-3000:]}"
    checkpoints = out / "wae_digits" / "version_0" / "checkpoints"
    leftovers = [p for p in checkpoints.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    assert len(leftovers) == 1  # the half-written file, never renamed over last.ckpt
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 4  # the first save, whole
    AtomicCheckpointIO().save_checkpoint(state, checkpoints / "last.ckpt")
    assert not any(p.name.startswith(".last.ckpt.tmp-") for p in checkpoints.iterdir())
