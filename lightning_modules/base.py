"""What every generative model of the project shares: shapes, the latent prior, `sample`.

Subclasses build `self.decoder` (the generator G: Z -> X) in their `__init__`. Callbacks rely
only on `sample(num_samples)` (and `encode` / `decode` where a model has an encoder), so any
LightningModule with those methods works with them.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lightning_modules.losses import check_prior_name, sample_prior
from lightning_modules.networks import check_data_shape, is_image_shape


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
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block; afterwards every submodule gets its own previous
    mode back (a submodule kept in eval mode on purpose stays so)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class GenerativeModule(L.LightningModule):
    """Base class: data_shape, latent_dim, prior, `decode`, `sample`, batch checks."""

    decoder: torch.nn.Module

    def __init__(self, data_shape: Sequence[int], latent_dim: int, prior: str) -> None:
        super().__init__()
        self.data_shape = check_data_shape(data_shape)
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}.")
        check_prior_name(prior)
        self.latent_dim = int(latent_dim)
        self.prior = prior
        # Manual optimisation throughout: adversarial models step several optimisers per batch.
        self.automatic_optimization = False
        self._rng_states_to_restore: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        # Denormal floats (below 1.2e-38) in early convolution gradients slowed CPU training of the
        # digits WAE 20x (11.2 s vs 0.54 s for 3 epochs); flushing them to zero changes no result
        # at float32 precision. The setting is process-wide; it has no effect on GPUs.
        torch.set_flush_denormal(True)

    def resolve_output_activation(self, output_activation: str) -> str:
        """"auto": tanh for images (datamodules scale them to [-1, 1]), none for vectors."""
        if output_activation == "auto":
            return "tanh" if is_image_shape(self.data_shape) else "none"
        return output_activation

    def sample_latent(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Latent codes from the prior P_Z on the module's device. -> (num_samples, latent_dim)."""
        z = sample_prior(self.prior, num_samples, self.latent_dim, generator=generator)
        return z.to(self.device)

    def decode(self, z: Tensor) -> Tensor:
        """G(z). (B, latent_dim) -> (B, *data_shape)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decode expects codes of shape (B, {self.latent_dim}), got {tuple(z.shape)}.")
        return self.decoder(z)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw (num_samples, *data_shape) samples of P_G = G#P_Z in the data range.

        Runs the decoder in eval mode (batch norm uses its running statistics) and restores the
        previous mode afterwards.
        """
        with eval_mode(self.decoder):
            return self.decode(self.sample_latent(num_samples, generator))

    def batch_data(self, batch: Any) -> Tensor:
        """The data tensor of a batch ((x, y) tuples give x), checked against data_shape."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.data_shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} was built for data of shape {self.data_shape} (batch "
                f"(B, {', '.join(map(str, self.data_shape))})), but got a batch of shape {got}. "
                "Build the model with the datamodule's dims (the CLI links data.dims to "
                "model.data_shape) or resize the data."
            )
        return x

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the random states (torch, CUDA, numpy, Python) with the weights: the models draw
        latent codes from them, so a resumed run needs them to replay an uninterrupted one."""
        checkpoint["rng_states"] = collect_rng_states()

    def on_train_epoch_start(self) -> None:
        # Restored here, not at load time: the sanity-check validation of a resumed fit draws
        # samples between loading and the first epoch, which the uninterrupted run did not.
        if self._rng_states_to_restore is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights whose shapes do not fit this model (another latent_dim, data shape or
        width), with the model's sizes in the message instead of torch's per-layer error."""
        own = self.state_dict()
        mismatched = [
            f"{name}: {tuple(value.shape)} in the checkpoint, {tuple(own[name].shape)} here"
            for name, value in checkpoint.get("state_dict", {}).items()
            if name in own and tuple(value.shape) != tuple(own[name].shape)
        ]
        if mismatched:
            raise ValueError(
                f"The checkpoint's weights do not fit this {type(self).__name__}, built with "
                f"latent_dim={self.latent_dim} and data_shape={self.data_shape}: "
                f"{'; '.join(mismatched[:3])}. Load it with the hyperparameters it was trained with "
                "(do not override latent_dim, data_shape or widths), or train a new model."
            )
        self._rng_states_to_restore = checkpoint.get("rng_states")
