"""Test-only helpers that several test files import (fixtures are in conftest.py, subprocess
helpers in probes.py):

- `one_torch_thread()`: a block with torch on one thread (the `one_thread` fixture, and
  module-scoped fixtures that train something);
- `reference_generators(log, sqrt)`: every registry row's f written out independently of
  `maths.divergences`, for numpy (`REFERENCE_F`, for integrals) or high-precision (mpmath) arithmetic;
- `REF` and `ref_*`: the registry's tables (f, f', g_f, g_f^{-1}, the fused f*(g_f), domains,
  f'(1), slopes) in numpy, and `reference_dual_value`: a critic's dual value computed from them;
- `TrivialModule`: the least a LightningModule needs to be fitted (one linear layer trained on a
  constant), a base for the stand-in models that callbacks are tested on;
- `ImageLogger`: a logger with a W&B-style `log_image`, recording what it gets;
- `dual_value(critic, real, fake)`: a model's dual value, as evaluation computes it;
- `small_config(name, folder)`, `CONFIGS`, `SMALL`: a digits config of each model made small for
  quick CLI runs (tests/test_devices.py, tests/test_gpu.py);
- `write_mnist(root, folder)`: MNIST's idx files, small, in the real format.
"""

from __future__ import annotations

import math
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
import yaml
from torch import nn

from maths.layers import eval_mode


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block; the previous number of threads after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_generators(log: Callable = np.log, sqrt: Callable = np.sqrt) -> dict[str, Callable]:
    """f(u) of every registry row with the registry's conventions (jensen_shannon = 2 JS, gan =
    2 JS - log 4), written from the table in docs/theory.md 2.1 with the given log and sqrt."""
    return {
        "kl": lambda u: u * log(u),
        "reverse_kl": lambda u: -log(u),
        "pearson": lambda u: (u - 1) ** 2,
        "neyman": lambda u: (1 - u) ** 2 / u,
        "hellinger": lambda u: (sqrt(u) - 1) ** 2,
        "jensen_shannon": lambda u: u * log(u) - (u + 1) * log((u + 1) / 2),
        "gan": lambda u: u * log(u) - (u + 1) * log(u + 1),
        "total_variation": lambda u: abs(u - 1) / 2,
    }


REFERENCE_F = reference_generators()  # numpy, float64


# ---- the f-divergence registry written out (unscaled) ---------------------------------------------

LOG2 = math.log(2.0)


def _xlogx(u):
    return np.where(u > 0, u * np.log(np.where(u > 0, u, 1.0)), 0.0)


def _tv_inverse(t):  # +-40 stands for +-inf (tanh(40) == 1 in float64) at |t| = 1/2
    return np.where(np.abs(2 * t) >= 1, 40.0 * np.sign(t), np.arctanh(np.clip(2 * t, -0.5, 0.5)))


# name: (f(u), f'(u), g_f(v), g_f^{-1}(t), fused f*(g_f(v))), from the tables of docs/theory.md 2.1 and 2.3, numpy float64
REF = {
    "kl": (lambda u: _xlogx(u), lambda u: np.log(u) + 1, lambda v: v, lambda t: t, lambda v: np.exp(v - 1)),
    "reverse_kl": (lambda u: -np.log(u), lambda u: -1 / u, lambda v: -np.exp(-v), lambda t: -np.log(-t),
                   lambda v: v - 1),
    "pearson": (lambda u: (u - 1) ** 2, lambda u: 2 * (u - 1), lambda v: v, lambda t: t, lambda v: v**2 / 4 + v),
    "neyman": (lambda u: (1 - u) ** 2 / u, lambda u: 1 - 1 / u**2, lambda v: -np.expm1(-v),
               lambda t: -np.log1p(-t), lambda v: 2 - 2 * np.exp(-v / 2)),
    "hellinger": (lambda u: (np.sqrt(u) - 1) ** 2, lambda u: 1 - 1 / np.sqrt(u), lambda v: -np.expm1(-v),
                  lambda t: -np.log1p(-t), np.expm1),
    "jensen_shannon": (lambda u: _xlogx(u) - (u + 1) * np.log((u + 1) / 2), lambda u: np.log(2 * u / (u + 1)),
                       lambda v: LOG2 - np.logaddexp(0, -v), lambda t: -np.log(2 * np.exp(-t) - 1),
                       lambda v: np.logaddexp(0, v) - LOG2),
    "gan": (lambda u: _xlogx(u) - (u + 1) * np.log(u + 1), lambda u: np.log(u / (u + 1)),
            lambda v: -np.logaddexp(0, -v), lambda t: -np.log(np.expm1(-t)), lambda v: np.logaddexp(0, v)),
    "total_variation": (lambda u: np.abs(u - 1) / 2, lambda u: np.sign(u - 1) / 2, lambda v: np.tanh(v) / 2,
                        _tv_inverse, lambda v: np.tanh(v) / 2),
}


def _ref(k):
    def ref(name, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return REF[name][k](np.asarray(x, dtype=np.float64))
    return ref


ref_f, ref_f_prime, ref_activation, ref_inverse_activation, ref_fused = (_ref(k) for k in range(5))

REF_DOMAIN = {"kl": (-math.inf, math.inf), "reverse_kl": (-math.inf, 0.0), "pearson": (-math.inf, math.inf),
              "neyman": (-math.inf, 1.0), "hellinger": (-math.inf, 1.0), "jensen_shannon": (-math.inf, LOG2),
              "gan": (-math.inf, 0.0), "total_variation": (-0.5, 0.5)}
REF_F_AT_ZERO = {"kl": 0.0, "reverse_kl": math.inf, "pearson": 1.0, "neyman": math.inf, "hellinger": 1.0,
                 "jensen_shannon": LOG2, "gan": 0.0, "total_variation": 0.5}
REF_F_PRIME_ONE = {"kl": 1.0, "reverse_kl": -1.0, "pearson": 0.0, "neyman": 0.0, "hellinger": 0.0,
                   "jensen_shannon": 0.0, "gan": -LOG2, "total_variation": 0.0}
REF_LIPSCHITZ = {"kl": 1.0, "pearson": 1.0, "jensen_shannon": 1.0, "gan": 1.0, "total_variation": 0.5,
                 "reverse_kl": math.inf, "neyman": math.inf, "hellinger": math.inf}


def reference_offset(name: str) -> float:
    """v0 of the unscaled row, the raw critic output whose activation is the optimal constant critic
    f'(1): g_f^{-1}(f'(1)) (1 for kl, 0 for the other rows; lambda v0 for the row of lambda f)."""
    return float(ref_inverse_activation(name, REF_F_PRIME_ONE[name]))


def reference_dual_terms(name: str, lam: float, raw_p: np.ndarray, raw_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample terms of the dual value of a critic network with raw outputs raw_p on P's samples
    and raw_q on Q's, read through the row of lambda f: v = r + lambda v0, h = lambda g_f(v / lambda)
    on P and (lambda f)*(h) = lambda f*(g_f(v / lambda)) on Q."""
    offset = reference_offset(name)
    p, q = np.asarray(raw_p, dtype=np.float64) / lam + offset, np.asarray(raw_q, dtype=np.float64) / lam + offset
    return lam * ref_activation(name, p), lam * ref_fused(name, q)


def reference_dual_value(name: str, lam: float, raw_p: np.ndarray, raw_q: np.ndarray) -> float:
    """E_P[h] - E_Q[(lambda f)*(h)] from `reference_dual_terms`."""
    on_p, on_q = reference_dual_terms(name, lam, raw_p, raw_q)
    return float(on_p.mean() - on_q.mean())


class TrivialModule(L.LightningModule):
    """One linear layer trained on a constant with SGD, an empty validation step: what a Trainer
    needs to fit a stand-in model whose interesting methods (sample, encode, ...) subclasses add."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(torch.ones(1, 2)).square().sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ImageLogger(Logger):
    """Records every `log_image(key, images, step)` as (key, images[0], step); raises in it when `fail`."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        super().__init__()
        self.root, self.fail = root, fail
        self.images: list[tuple[str, torch.Tensor, int]] = []

    @property
    def name(self) -> str:
        return "image_logger"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self.root)

    @property
    def log_dir(self) -> str:
        return str(self.root)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_image(self, key: str, images: list[torch.Tensor], step: int | None = None) -> None:
        if self.fail:
            raise RuntimeError("image service down")
        self.images.append((key, images[0].clone(), step))


def dual_value(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """What a model reports as its dual value: `critic.objective(real, fake)` (a
    `lightning_modules.critic.Critic`) without gradients, in eval mode."""
    with torch.no_grad(), eval_mode(critic):
        return critic.objective(real, fake)


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"wae": "wae_digits.yaml", "fgan": "fgan_digits.yaml", "primal_dual": "primal_dual_digits.yaml",
           "sinkhorn": "sinkhorn_digits.yaml"}
SMALL = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def small_config(name: str, folder: Path, callbacks: list[dict] | None = None) -> str:
    """configs/<name> with small networks, no callbacks but its checkpoint and what that monitors (and
    `callbacks`), logs in `folder`."""
    settings = yaml.safe_load((ROOT / "configs" / CONFIGS[name]).read_text())
    trainer = settings["trainer"]
    kept = ("ModelCheckpoint", "SinkhornBoundCallback") if name == "sinkhorn" else ("ModelCheckpoint",)  # what it monitors
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith(kept)] + (callbacks or [])
    trainer["default_root_dir"] = trainer["logger"]["init_args"]["save_dir"] = str(folder)
    for key in ("width", "critic_width", "latent_critic_width"):
        if key in settings["model"]["init_args"]:
            settings["model"]["init_args"][key] = 8
    path = folder / CONFIGS[name]
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def mnist_pixels(n: int, offset: int) -> np.ndarray:
    """(n, 28, 28) uint8 with pixel (i, r, c) = (offset + i + r + 3 c) % 256."""
    i, r, c = np.ogrid[:n, :28, :28]
    return ((offset + i + r + 3 * c) % 256).astype(np.uint8)


def write_mnist(root: Path, folder: str, n_train: int = 20, n_test: int = 10) -> None:
    """idx files (big-endian header, magic 2051 images / 2049 labels) in <root>/<folder>/raw/."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
        images = struct.pack(">IIII", 2051, n, 28, 28) + mnist_pixels(n, offset).tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        labels = struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
