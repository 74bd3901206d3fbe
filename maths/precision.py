"""Full precision islands inside mixed-precision training.

Under `--trainer.precision bf16-mixed`, autocast runs matrix products and convolutions in bfloat16.
What must not lose precision (transport costs, kernel Gram matrices, Monte Carlo density ratios,
operator-norm power iterations) runs with `autocast_off`, its bfloat16 or float16 inputs `promoted`
to float32 (float64 stays float64). Gradients flow through the promotion.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def promoted(x: Tensor) -> Tensor:
    """x in float32 if it is bfloat16 or float16, else unchanged."""
    return x.float() if x.dtype in LOW_PRECISION else x


@contextmanager
def autocast_off(device: torch.device | str) -> Iterator[None]:
    """No autocast for `device`'s type inside the block."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
