"""InceptionV3 features for FID, comparable with the literature (docs/theory.md 6); needs torch-fidelity.

The network is torchmetrics' `NoTrainInceptionV3` (torch-fidelity's port of the TensorFlow FID
Inception, 2048 pool features). Its weights are downloaded at first use into the torch hub cache,
or read from a local file; offline, with neither, the error names the file, where it is looked
for, and both remedies. Images are adapted as the standard implementations do: mapped from the
data range to uint8 [0, 255], grey images repeated to 3 channels, and resized to 299 x 299
(bilinear, antialiased) inside the network, which then scales them to [-1, 1].
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_FILE = os.path.basename(WEIGHTS_URL)
INSTALL_HINT = "pip install torch-fidelity (or pip install 'primal-dual-gan-ae[inception]')"


def cached_weights_path() -> str:
    """Where torch-fidelity's download lands and is looked for: `<torch hub dir>/checkpoints/<file>`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def missing_weights_error(err: BaseException) -> FileNotFoundError:
    """The offline error: which file, where it was looked for, and the two ways to supply it."""
    cached = cached_weights_path()
    return FileNotFoundError(
        f"InceptionV3 weights for FID not available: {WEIGHTS_FILE} is not in the torch hub cache\n"
        f"  looked for: {cached}\n"
        f"  and downloading it from {WEIGHTS_URL} failed ({type(err).__name__}: {err}).\n"
        f"  fix, either: (1) download that file on a machine with internet and put it at {cached} "
        f"(the torch hub cache; TORCH_HOME moves it), or (2) pass its path as "
        f"FIDCallback(inception_weights_path=...), which is torchmetrics' "
        f"FrechetInceptionDistance(feature_extractor_weights_path=...).\n"
        f"  Offline without the file, FIDCallback(feature_extractor=\"domain\") needs no download."
    )


def load_inception(weights_path: str | None = None) -> nn.Module:
    """torchmetrics' InceptionV3 returning (B, 2048) features of uint8 (B, 3, H, W) images.

    Weights from `weights_path`, else the torch hub cache, else downloaded by torch-fidelity.
    """
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception is torch-fidelity's network)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"Inception FID needs torch-fidelity: {INSTALL_HINT}") from err
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"InceptionV3 weights file {os.path.abspath(weights_path)} (inception_weights_path) does not exist")
    path = weights_path or (cached_weights_path() if os.path.isfile(cached_weights_path()) else None)
    try:
        with torch.random.fork_rng(devices=[]):  # its random initial weights are replaced: keep training's stream
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path)
    except (OSError, RuntimeError) as err:  # URLError, timeouts and SSL errors are OSErrors
        if path is not None:
            raise
        raise missing_weights_error(err) from err


class InceptionFeatures(nn.Module):
    """(B, C, H, W) images in `data_range`, C in {1, 3}, any size -> (B, 2048) Inception features."""

    num_features = 2048
    feature_name = "inception"

    def __init__(self, inception: nn.Module, data_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.inception = inception
        self.data_range = data_range

    @classmethod
    def load(cls, weights_path: str | None = None, data_range: tuple[float, float] = (-1.0, 1.0)) -> "InceptionFeatures":
        return cls(load_inception(weights_path), data_range)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # a fixed feature map: never training mode

    def to_uint8(self, x: Tensor) -> Tensor:
        """Data range -> uint8 [0, 255] (rounded), grey repeated to RGB. (B, C, H, W) -> (B, 3, H, W)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception FID needs images of shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
        low, high = self.data_range
        x = ((x.float() - low) * (255.0 / (high - low))).round().clamp(0, 255).to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def forward(self, x: Tensor) -> Tensor:
        return self.inception(self.to_uint8(x))  # resized to 299 x 299 inside
