"""lightning_modules.evaluation.PrimalDualEvaluation, PrimalDual's epoch aggregates: the means over
every sample of every update (and, under DDP, of every rank) against torch.cat then mean in float64,
and the Gaussian codes concatenated in order."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.evaluation import TERMS, PrimalDualEvaluation

WORLD_SIZE = 2


def batches(seed: int, sizes: tuple[int, ...]) -> list[tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch: float32 terms of very different scales (B,) for every name, and codes (B, 3)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        terms = {name: (10.0 ** (k - 3)) * torch.randn(size, generator=g) + k for k, name in enumerate(TERMS)}
        out.append((terms, (torch.randn(size, 3, generator=g), torch.randn(size, 3, generator=g))))
    return out


def _reference_means(data: list) -> dict[str, torch.Tensor]:
    """The mean of each term over all samples: torch.cat, then mean in float64."""
    return {name: torch.cat([terms[name] for terms, _ in data]).double().mean() for name in TERMS}


def test_sums_over_updates_are_the_means_of_the_concatenated_terms():
    data = batches(0, (5, 7, 2))
    metric = PrimalDualEvaluation()
    for terms, codes in data:
        metric.update(terms, codes)
    values = metric.compute()
    assert values["count"].item() == 14
    for name, expected in _reference_means(data).items():
        assert values[name].dtype == torch.float64
        torch.testing.assert_close(values[name], expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(values["mean"], torch.cat([codes[0] for _, codes in data]), rtol=0, atol=0)
    torch.testing.assert_close(values["log_var"], torch.cat([codes[1] for _, codes in data]), rtol=0, atol=0)


def test_without_codes_and_after_reset():
    data = batches(1, (4, 3))
    metric = PrimalDualEvaluation()
    metric.update(*data[0])
    metric.reset()
    metric.update(data[1][0])  # no codes: a deterministic encoder
    values = metric.compute()
    assert values["count"].item() == 3 and "mean" not in values and "log_var" not in values
    for name, expected in _reference_means(data[1:]).items():
        torch.testing.assert_close(values[name], expected, rtol=1e-13, atol=0)


RANK_BATCHES = {0: (5, 3), 1: (4,)}  # unequal numbers of samples and of batches on the two ranks


def _evaluate_on_rank(rank: int, folder: str) -> None:
    """One gloo process: update with this rank's batches, compute (the DDP reduction), save the values."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        metric = PrimalDualEvaluation()
        for terms, codes in batches(10 + rank, RANK_BATCHES[rank]):
            metric.update(terms, codes)
        torch.save(metric.compute(), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_gloo_processes_reduce_to_the_means_over_both_ranks(tmp_path: Path):
    # fork: the children start with the parent's imports (spawning two fresh interpreters took 10-15 s here)
    processes = mp.start_processes(_evaluate_on_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=False,
                                   start_method="fork")
    deadline = time.monotonic() + 60
    while not processes.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish in 60 s")
    data = {rank: batches(10 + rank, sizes) for rank, sizes in RANK_BATCHES.items()}
    everything = data[0] + data[1]
    expected = _reference_means(everything)
    for rank in range(WORLD_SIZE):
        values = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert values["count"].item() == 12
        for name in TERMS:
            torch.testing.assert_close(values[name], expected[name], rtol=1e-13, atol=0)
        # all ranks' codes, in rank order
        torch.testing.assert_close(values["mean"], torch.cat([codes[0] for _, codes in everything]), rtol=0, atol=0)
        torch.testing.assert_close(values["log_var"], torch.cat([codes[1] for _, codes in everything]), rtol=0, atol=0)
