"""The GPU suite: what tests/test_devices.py checks on the CPU, on CUDA. Marked `gpu` and skipped
without CUDA (every CI run); run it on a machine with a GPU with `python -m pytest tests -m gpu`, or
through `python -m benchmarks.gpu_check`, which adds a CUDA throughput run and writes a report.

- every model x {32-true, bf16-mixed} trains and validates through the CLI on one GPU, and with
  `compile`, `channels_last` and `--trainer.deterministic true`;
- bf16-mixed certified numbers equal a 32-true validation of the checkpoint on the GPU;
- every callback on CUDA (the flagship's: FID, W bracket, exact dual, grids, curves);
- the certificate's Lanczos restart with its basis on the GPU;
- two processes on two GPUs (NCCL) log equal values and keep equal weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli.command import cli_main
from helpers import CONFIGS, SMALL, small_config
from maths.lipschitz import _top_eigenvalue
from probes import run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ON_GPU = [arg if arg != "cpu" else "gpu" for arg in SMALL]


def val_metrics(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_model_on_one_gpu(tmp_path, name, precision):
    cli = cli_main(["fit", "--config", small_config(name, tmp_path), *ON_GPU, "--trainer.precision", precision])
    metrics = val_metrics(cli)
    assert cli.trainer.strategy.root_device.type == "cuda"
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("option", ["compile", "channels_last"])
def test_speed_options_on_one_gpu(tmp_path, option):
    cli = cli_main(["fit", "--config", small_config("wae", tmp_path), *ON_GPU, "--trainer.precision", "bf16-mixed",
                    f"--model.init_args.{option}", "true"])
    assert all(math.isfinite(v) for v in val_metrics(cli).values())


def test_deterministic_on_one_gpu_with_the_fid_features_trained(tmp_path):
    fid = {"class_path": "callbacks.FIDCallback", "init_args": {"num_samples": 64, "feature_path": str(tmp_path / "f.pt")}}
    cli = cli_main(["fit", "--config", small_config("wae", tmp_path, [fid]), *ON_GPU, "--trainer.deterministic", "true"])
    assert math.isfinite(val_metrics(cli)["val/fid_digits"])


def test_bf16_certified_numbers_equal_fp32_on_the_gpu(tmp_path):
    exact_dual = {"class_path": "callbacks.ExactDualCallback", "init_args": {"num_samples": 64}}
    config = small_config("primal_dual", tmp_path, [exact_dual])
    fit = cli_main(["fit", "--config", config, *ON_GPU, "--trainer.precision", "bf16-mixed"])
    again = cli_main(["validate", "--config", config, *ON_GPU, "--trainer.precision", "32-true",
                      "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path])
    trained, recomputed = val_metrics(fit), val_metrics(again)
    for key in ("val/dual_lower_bound", "val/lipschitz_bound", "val/dual", "val/link_lower", "val/link_upper"):
        assert recomputed[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-7), key


def test_every_callback_on_cuda(tmp_path):
    callbacks = [
        {"class_path": "callbacks.FIDCallback", "init_args": {"num_samples": 128, "feature_path": str(tmp_path / "f.pt")}},
        {"class_path": "callbacks.SinkhornBoundCallback", "init_args": {"num_samples": 128, "exact": False}},
        {"class_path": "callbacks.ExactDualCallback", "init_args": {"num_samples": 128}},
        {"class_path": "callbacks.SampleGridCallback", "init_args": {"num_samples": 16}},
        {"class_path": "callbacks.ReconstructionGridCallback", "init_args": {"num_images": 8}},
        {"class_path": "callbacks.LatentInterpolationCallback", "init_args": {"num_pairs": 2, "steps": 4}},
        {"class_path": "callbacks.MetricCurvesCallback"},
        {"class_path": "callbacks.generalization.GeneralizationGapCallback", "init_args": {"num_samples": 64}},
    ]
    cli = cli_main(["fit", "--config", small_config("primal_dual", tmp_path, callbacks), *ON_GPU,
                    "--trainer.precision", "bf16-mixed"])
    metrics = val_metrics(cli)
    for key in ("val/fid_digits", "val/w_lower", "val/w_upper", "val/link_lower", "val/link_upper", "val/generalization_gap"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/link_upper"] <= metrics["val/w_upper"] + 1e-6  # the exact dual (kl, f(1) = 0) is below W_c


def test_lanczos_restarts_with_its_basis_on_the_gpu():
    """A restart every 4 Lanczos steps: the Ritz vector is formed on the GPU from a CPU eigenvector."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    matrix = (a @ a.T).cuda()  # symmetric PSD
    start = torch.randn(64, generator=generator, dtype=torch.float64).cuda()
    top, converged = _top_eigenvalue(lambda v: matrix @ v, start, tol=1e-10, max_iter=5000, basis=4)
    assert converged and top == pytest.approx(torch.linalg.eigvalsh(matrix)[-1].item(), rel=1e-8)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_nccl_log_equal_values(tmp_path):
    probe = tmp_path / "probe"
    result = run_train(
        ["fit", "--config", small_config("primal_dual", tmp_path), *ON_GPU[:-2], "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.precision", "bf16-mixed",
         "--trainer.callbacks+=" + json.dumps({"class_path": "probes.MetricsProbe", "init_args": {"out_dir": str(probe)}})],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["parameters"] == ranks[1]["parameters"] and all(r["reducer_buckets"] == 0 for r in ranks)
    val = [{k: v for k, v in r["final_metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1]
