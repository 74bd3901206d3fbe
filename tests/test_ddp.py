"""DDP through the CLI (SPEC 8): two CPU processes (gloo) with `--trainer.strategy ddp`, for the WAE,
the FGAN and the primal-dual model with the FID, Sinkhorn and image callbacks (sample grids, and
reconstructions and interpolations for the models with an encoder; the generalisation gap and the
metric curves for the primal-dual model).

One run per model (process start-up dominates), checking together that:
- plain `ddp` works for these manually optimised modules, whose updates all-reduce only the network
  they change (DDP's reducer stays idle);
- every rank logged the same value for every validation metric (FID, Sinkhorn bracket, the
  model's own), read from each rank's `trainer.callback_metrics` (tests/probes.py: MetricsProbe);
- ranks draw different training noise and the Sinkhorn callback's generated samples differ
  between ranks, while the parameters stay identical (the gradients are averaged);
- one log folder, checkpoints and images written once, the summary printed once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from callbacks.features import load_or_train_domain_features
from datamodules import DigitsDataModule
from lightning_modules.rng import collect_rng_states, seed_rank
from lightning_modules.wae import WAE
from helpers import one_torch_thread
from probes import ROOT, run_train

EPOCHS, TRAIN_BATCHES = 2, 3
MODELS = {
    # config, the model's own validation keys, optimiser steps per batch (the primal-dual config has
    # n_critic 2: 2 latent critic + 2 data critic + 1 encoder-generator steps), extra arguments
    "wae": ("wae_digits.yaml", ["val/primal", "val/recon"], 1, []),
    "fgan": ("fgan_digits.yaml", ["val/critic_objective", "val/lipschitz_bound"], 2,
             ["--model.init_args.lipschitz", "spectral_norm"]),
    "primal_dual": ("primal_dual_digits.yaml", ["val/primal", "val/dual", "val/gap", "val/latent_divergence_mc"], 5,
                    ["--model.init_args.mc_samples", "256"]),
}


@pytest.fixture(scope="module")
def fid_features(tmp_path_factory) -> Path:
    """One FID feature file for the three runs, trained here. (Trained inside a run, on rank 0 only,
    it would shift rank 0's random stream: its network is built outside the callback's fork_rng.)"""
    path = tmp_path_factory.mktemp("fid") / "fid_features_digits.pt"
    dm = DigitsDataModule()
    dm.setup("fit")
    with one_torch_thread():  # small convolutions: two threads on shared cores ran it several times slower
        load_or_train_domain_features(dm, str(path))
    return path


def checkpointing_only(config: str, folder: Path) -> Path:
    """A copy of configs/`config` whose only callback is its ModelCheckpoint: the test adds every
    other callback itself, with small settings, and checks every file they write."""
    settings = yaml.safe_load((ROOT / "configs" / config).read_text())
    settings["trainer"]["callbacks"] = [c for c in settings["trainer"]["callbacks"]
                                        if c["class_path"].endswith("ModelCheckpoint")]
    path = folder / config
    path.write_text(yaml.safe_dump(settings))
    return path


def callback(class_path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


@pytest.mark.parametrize("name", MODELS)
def test_ddp_two_processes_log_equal_values_and_write_once(tmp_path, fid_features, name):
    config, model_keys, steps_per_batch, extra = MODELS[name]
    out, probe = tmp_path / "out", tmp_path / "probe"
    image_names = ["samples"]
    encoder_callbacks = []
    other_files = []
    if name != "fgan":  # models with an encoder: the reconstruction and interpolation grids too
        encoder_callbacks = [callback("callbacks.ReconstructionGridCallback", num_images=8),
                             callback("callbacks.LatentInterpolationCallback", num_pairs=2, steps=4)]
        image_names += ["reconstructions", "interpolation"]
    if name == "primal_dual":  # and the callbacks made for it: the gap and the primal / dual / gap curves
        encoder_callbacks += [callback("callbacks.generalization.GeneralizationGapCallback", num_samples=64, tol=0.05),
                              callback("callbacks.curves.MetricCurvesCallback")]
        model_keys = [*model_keys, "val/generalization_gap", "val/w_train_val_lower", "val/w_train_val_upper"]
        other_files = ["primal_dual_gap.csv", "primal_dual_gap.png"]
    result = run_train(
        [
            "fit", "--config", str(checkpointing_only(config, tmp_path)), *extra,
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(TRAIN_BATCHES),
            "--trainer.limit_val_batches", "2", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            callback("callbacks.FIDCallback", feature_extractor="domain", num_samples=64, batch_size=32,
                     feature_path=str(fid_features)),
            callback("callbacks.sinkhorn.SinkhornBoundCallback", num_samples=64, tol=0.05, max_seconds=30),
            callback("callbacks.SampleGridCallback", num_samples=16, every_n_epochs=1),
            *encoder_callbacks,
            callback("probes.MetricsProbe", out_dir=str(probe)),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"DDP run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    # DDP's reducer never runs: each optimiser step all-reduces its own network's gradients, once, and
    # a one-element finiteness flag per guarded step (two for the autoencoder step with both losses).
    assert all(r["reducer_buckets"] == 0 for r in ranks)
    sizes = ranks[0]["all_reduce_sizes"]
    network_sizes = [s for s in sizes if s > 2]
    by_optimizer = ranks[0]["optimizer_sizes"]
    order = {"wae": [0], "fgan": [1, 0], "primal_dual": [1, 1, 2, 2, 0]}[name]  # optimisers in step order
    expected_networks = [by_optimizer[i] for i in order]
    assert network_sizes == expected_networks and len(sizes) - len(network_sizes) == steps_per_batch, sizes
    assert [r["global_rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["global_step"] == EPOCHS * TRAIN_BATCHES * steps_per_batch for r in ranks)

    # Every validation metric: present, finite, and the same on both ranks, after every validation
    # epoch and at the end (callbacks that log at on_train_epoch_end appear only there).
    expected = {"val/fid_digits", "val/w_lower", "val/w_upper", "val/w_num_samples", *model_keys}
    assert [len(r["epochs"]) for r in ranks] == [EPOCHS, EPOCHS]
    records = [(f"epoch {e0['epoch']}", e0["metrics"], e1["metrics"]) for e0, e1 in zip(ranks[0]["epochs"], ranks[1]["epochs"])]
    records.append(("the end", ranks[0]["final_metrics"], ranks[1]["final_metrics"]))
    for when, metrics0, metrics1 in records:
        val0 = {k: v for k, v in metrics0.items() if k.startswith("val/")}
        val1 = {k: v for k, v in metrics1.items() if k.startswith("val/")}
        assert set(val0) == set(val1) and {"val/fid_digits", "val/w_upper"} <= set(val0)
        for key in val0:
            assert val0[key] == val1[key] or (math.isnan(val0[key]) and math.isnan(val1[key])), (
                f"{when}: {key} is {val0[key]} on rank 0 and {val1[key]} on rank 1"
            )
    final = ranks[0]["final_metrics"]
    assert expected <= set(final) and all(math.isfinite(final[k]) for k in expected), sorted(final)
    assert 0 <= final["val/w_lower"] <= final["val/w_upper"]
    assert final["val/w_num_samples"] == 64  # 32 real samples from each rank, gathered

    # Per-rank randomness, shared weights.
    assert ranks[0]["noise"] != ranks[1]["noise"], "both ranks draw the same latent codes in training"
    sinkhorn = [[h for h in r["sample_hashes"] if h.startswith("SinkhornBoundCallback:")] for r in ranks]
    assert sinkhorn[0] and len(sinkhorn[0]) == len(sinkhorn[1])
    assert all(a != b for a, b in zip(*sinkhorn)), "both ranks generated the same samples for the bound"
    assert ranks[0]["parameters"] == ranks[1]["parameters"], "the ranks' weights drifted apart"
    assert ranks[0]["buffers"] == ranks[1]["buffers"]  # batch-norm statistics: DDP copies rank 0's at each forward

    # Written once: one version folder, the expected checkpoints and images, one summary.
    run_dir = out / config.removesuffix(".yaml")
    assert sorted(p.name for p in run_dir.iterdir()) == ["version_0"]
    checkpoints = sorted(p.name for p in (run_dir / "version_0" / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and all(not n.startswith(".") and "-v" not in n for n in checkpoints)
    images = sorted(p.name for p in (run_dir / "version_0" / "images").iterdir())
    assert images == sorted([f"{image}_epoch={e:04d}.png" for image in image_names for e in range(EPOCHS)] + other_files)
    assert result.stdout.count("fit finished") == 1
    state = torch.load(run_dir / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == EPOCHS * TRAIN_BATCHES * steps_per_batch


# ---- per-rank random streams, without processes ------------------------------------------------
# (The run above also checks that the ranks' noise differs, but there the FID callback alone already
# makes rank 0's stream differ: callbacks/features.py builds its network outside fork_rng on rank 0
# only. These tests check the seeding itself.)


def draws_after(rank: int, state: torch.Tensor, step) -> torch.Tensor:
    torch.set_rng_state(state)
    step(rank)
    return torch.randn(6)


def test_seed_rank_keeps_rank_zero_and_gives_other_ranks_their_own_stream():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    draws = [draws_after(rank, state, seed_rank) for rank in range(3)]
    torch.set_rng_state(state)
    assert torch.equal(draws[0], torch.randn(6))  # rank 0 draws what a one-process run draws
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    assert torch.equal(draws_after(1, state, seed_rank), draws[1])  # a function of the run's seed


def test_models_reseed_ranks_at_setup_and_after_restoring_a_checkpoint():
    """What a two-process run does on each rank, with a stand-in for the trainer."""
    model = WAE(data_shape=(2,), latent_dim=2, width=8)
    torch.manual_seed(0)
    state = torch.get_rng_state()

    def setup_as(rank: int) -> None:
        model._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        model.setup("fit")

    def resume_as(rank: int) -> None:  # every rank restores rank 0's saved states, then reseeds
        model._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        model._rng_states_to_restore = saved
        torch.manual_seed(123)  # whatever the process drew before the first resumed epoch
        model.on_train_epoch_start()

    try:
        fresh = [draws_after(rank, state, setup_as) for rank in (0, 1)]
        torch.set_rng_state(state)
        saved = collect_rng_states()
        resumed = [draws_after(rank, state, resume_as) for rank in (0, 1)]
    finally:
        model._trainer = None
    torch.set_rng_state(state)
    single = torch.randn(6)
    assert torch.equal(fresh[0], single) and not torch.equal(fresh[1], single)
    assert torch.equal(resumed[0], single) and not torch.equal(resumed[1], single)


def test_main_destroys_the_process_group_it_leaves_behind(tmp_path):
    """main closes a process group the run left open: a gloo group torn down by the garbage
    collector at interpreter exit intermittently aborts a finished run (SIGABRT, exit -6)."""
    from cli.command import close_process_group

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    close_process_group()
    assert not torch.distributed.is_initialized()
    close_process_group()  # and nothing to do without one
