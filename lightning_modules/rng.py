"""Random states of a training process: saved in checkpoints, restored on resume, and one stream
per DDP rank (so that ranks draw different latent codes)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python random states, as types that `torch.load(weights_only=True)`
    accepts (tensors, ints, lists), so that checkpoints stay loadable without trusting pickles."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        # One state per device the saving process saw: a run resumed on fewer (or other) GPUs
        # restores the devices it has, instead of failing on the ones it has not.
        saved = states["cuda"]
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index], index)


def seed_rank(rank: int) -> None:
    """Give DDP rank `rank` its own torch random stream (CPU and CUDA).

    Every process of a DDP run is seeded alike (`seed_everything`), so without this all ranks
    draw the same latent codes and the extra processes add no new samples. Rank 0 keeps its
    stream (the one a one-process run draws); rank r > 0 reseeds with s + r, s drawn from the
    common stream, so the streams are distinct and still a function of the run's seed.
    """
    if rank > 0:
        base = int(torch.randint(0, 2**62, (1,)))  # (1,): the same value on every rank
        torch.manual_seed(base + rank)
