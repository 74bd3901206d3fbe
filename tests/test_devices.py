"""Where users run (docs: README, "Several GPUs"): every model in 32-true and bf16-mixed through the
CLI, certified numbers under bf16 equal to an fp32 recomputation from the checkpoint, 16-mixed refused
with a message, a guard for values logged with sync_dist off the module's device, random states of
more GPUs than the resuming machine has, one checkpoint for every rank, data loading for a GPU, and
a training step whose non-finite losses change no weight and cost one host sync.

The same checks on CUDA (and two-process NCCL) are in tests/test_gpu.py, marked `gpu`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lightning_modules.base as base
from cli.checkpoints import AtomicCheckpointIO
from cli.command import cli_main
from datamodules import DigitsDataModule, MNISTDataModule
from lightning_modules import FGAN, GenerativeModule, PrimalDual
from lightning_modules.rng import collect_rng_states, set_rng_states
from maths.lipschitz import _top_eigenvalue
from helpers import CONFIGS, SMALL, small_config

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_model_trains_and_validates_through_the_cli(tmp_path, name, precision):
    cli = cli_main(["fit", "--config", small_config(name, tmp_path), *SMALL, "--trainer.precision", precision])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert cli.trainer.global_step > 0 and str(cli.trainer.precision) == precision


def test_bf16_certified_numbers_equal_an_fp32_recomputation_from_the_checkpoint(tmp_path):
    """Evaluation runs outside autocast with seeds of its own: the certified bound, the dual and the
    exact-dual bracket logged at the end of a bf16-mixed fit are what a 32-true `validate` of the
    saved checkpoint computes."""
    exact_dual = {"class_path": "callbacks.ExactDualCallback", "init_args": {"num_samples": 64}}
    config = small_config("primal_dual", tmp_path, [exact_dual])
    fit = cli_main(["fit", "--config", config, *SMALL, "--trainer.precision", "bf16-mixed"])
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    trained = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")}
    again = cli_main(["validate", "--config", config, *SMALL, "--trainer.precision", "32-true", "--ckpt_path", checkpoint])
    recomputed = {k: float(v) for k, v in again.trainer.callback_metrics.items() if k.startswith("val/")}
    for key in ("val/dual_lower_bound", "val/lipschitz_bound", "val/dual", "val/primal", "val/link_lower", "val/link_upper"):
        assert recomputed[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-9), key


def test_16_mixed_stops_at_once_and_recommends_bf16():
    """On CUDA, 16-mixed (one loss scaler for several optimisers) is refused at setup, before any work.
    (On CPU, Lightning itself runs 16-mixed as bf16-mixed, so a stand-in trainer shows the check.)"""
    model = FGAN(data_shape=(2,), width=8, critic_width=8)
    model._trainer = SimpleNamespace(precision="16-mixed", world_size=1)
    try:
        with pytest.raises(ValueError, match=r"16-mixed is not supported by FGAN.*--trainer.precision bf16-mixed"):
            model.setup("fit")
    finally:
        model._trainer = None


def test_a_value_logged_with_sync_dist_off_the_module_device_fails(monkeypatch):
    """The guard the whole suite runs under (tests/conftest.py): on CPU every tensor is on the module's
    device, so a meta tensor stands in for the CPU tensor a CUDA module must not log."""
    monkeypatch.setattr(base, "CHECK_DEVICES", True)
    model = FGAN(data_shape=(2,), width=8, critic_width=8)
    model._current_fx_name = "validation_step"  # what Lightning sets before calling the hook
    with pytest.raises(AssertionError, match=r"val/x is logged with sync_dist=True from meta, but the module is on cpu"):
        model.log("val/x", torch.zeros((), device="meta"), sync_dist=True)


def test_resuming_with_fewer_gpus_than_the_checkpoint_saved(monkeypatch):
    """A checkpoint of a process that saw 4 GPUs, resumed on a machine with 1: the one device's state
    is restored, the others are left out (torch.cuda.set_rng_state_all raised an IndexError)."""
    states = collect_rng_states()
    states["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    set_rng_states(states)
    assert restored == [(0, 0)]


def _load_on_two_ranks(rank: int, paths: list[str], missing: str | None, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        if missing and rank == 1:  # this node lacks rank 0's file
            real = Path.is_file
            Path.is_file = lambda self: False if str(self) == missing else real(self)
        try:
            result = {"step": AtomicCheckpointIO().load_checkpoint(paths[rank])["global_step"]}
        except (FileNotFoundError, ValueError) as err:
            result = {"error": f"{type(err).__name__}: {err}"}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("missing", [False, True])
def test_every_rank_resumes_from_rank_zeros_checkpoint(tmp_path, missing):
    """Ranks that resolved `--ckpt_path` to different files load rank 0's; a rank without it stops."""
    paths = []
    for step in (7, 3):
        paths.append(str(tmp_path / f"step{step}.ckpt"))
        torch.save({"state_dict": {}, "global_step": step, "epoch": 0}, paths[-1])
    context = multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    workers = [context.Process(target=_load_on_two_ranks, args=(r, paths, paths[0] if missing else None, init, str(tmp_path)))
               for r in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if missing:  # both ranks stop, naming the rank that lacks the file (no rank waits forever)
        assert all("Rank(s) [1] cannot resume from" in r.get("error", "") and paths[0] in r["error"] for r in results)
    else:
        assert results == [{"step": 7}, {"step": 7}]


def test_data_loading_feeds_a_gpu_and_leaves_cpu_runs_alone():
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    digits, mnist = DigitsDataModule(), MNISTDataModule()
    for dm, trainer, expected in [(digits, cpu, (0, False)), (digits, gpu, (0, True)), (mnist, cpu, (0, False))]:
        dm.trainer = trainer
        assert dm.loader_settings() == expected
    mnist.trainer = gpu
    workers, pinned = mnist.loader_settings()
    assert pinned and 1 <= workers <= 8  # images decoded from disk: worker processes
    explicit = MNISTDataModule(num_workers=3)
    explicit.trainer = gpu
    assert explicit.loader_settings() == (3, True)


def test_a_training_step_syncs_the_host_once_and_a_nan_changes_no_weight(quiet_trainer, monkeypatch):
    """Finiteness is decided on the device: no bool() or item() of a tensor inside training_step, and
    the NaN loss's step is skipped by the fused Adam (the weights before it are the weights after)."""
    model = PrimalDual(data_shape=(1, 8, 8), width=8, critic_width=8, latent_critic_width=16, n_critic=2)
    calls = {"bool": 0, "item": 0}
    real_bool, real_item, real_step = torch.Tensor.__bool__, torch.Tensor.item, PrimalDual.training_step

    def counting_step(self, batch, batch_idx):
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.__setitem__("bool", calls["bool"] + 1) or real_bool(t))
        monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.__setitem__("item", calls["item"] + 1) or real_item(t))
        try:
            return real_step(self, batch, batch_idx)
        finally:
            monkeypatch.setattr(torch.Tensor, "__bool__", real_bool)
            monkeypatch.setattr(torch.Tensor, "item", real_item)

    monkeypatch.setattr(PrimalDual, "training_step", counting_step)
    quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
    assert calls == {"bool": 0, "item": 0}


def test_lanczos_restarts_from_its_top_ritz_vector():
    """The certificate's eigenvalue solver restarted every 4 steps still finds the top eigenvalue
    (on CUDA the restart mixes a CPU eigenvector into the GPU basis: tests/test_gpu.py)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    matrix = a @ a.T
    top, converged = _top_eigenvalue(lambda v: matrix @ v, torch.randn(64, generator=generator, dtype=torch.float64),
                                     tol=1e-10, max_iter=5000, basis=4)
    assert converged and top == pytest.approx(torch.linalg.eigvalsh(matrix)[-1].item(), rel=1e-8)
