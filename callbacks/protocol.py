"""The small contract callbacks expect of a LightningModule, checked up front.

Callbacks never import the project's models: they work with any LightningModule that has the
methods they name (`sample(num_samples)`; `encode` and `decode` for reconstruction-based ones).
"""

from __future__ import annotations

from typing import Sequence

import lightning as L


def require_methods(pl_module: L.LightningModule, callback: object, methods: Sequence[str]) -> None:
    """Raise TypeError naming what `pl_module` lacks for `callback`."""
    missing = [name for name in methods if not callable(getattr(pl_module, name, None))]
    if missing:
        signatures = {"sample": "sample(num_samples) -> Tensor", "encode": "encode(x) -> Tensor", "decode": "decode(z) -> Tensor"}
        wanted = ", ".join(signatures.get(name, name) for name in missing)
        raise TypeError(
            f"{type(callback).__name__} needs the LightningModule to define {wanted}; "
            f"{type(pl_module).__name__} does not. Add the method(s) or remove the callback."
        )
