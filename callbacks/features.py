"""Domain feature extractor for FID on labelled datamodules (docs/theory.md 6).

A small convnet classifier trained on the datamodule's training split; its penultimate layer (64
ReLU features) is the feature map of the Frechet distance, logged under the datamodule's name
(`val/fid_digits`), never as Inception FID. It works offline. For the digits (8x8) and MNIST (28x28)
the networks ship with the package (`callbacks/weights/`, trained by `python -m callbacks.train_features
digits|mnist`, their SHA-256 recorded), so FIDs compare across checkouts and machines; for other
labelled data the network is trained once and cached. A file records `dims` and `num_classes`; a
file that matches is loaded, not retrained.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

FILE_FORMAT = 1  # bump when the architecture or the saved keys change


def datamodule_feature_name(datamodule: Any) -> str:
    """`DigitsDataModule` -> "digits", `MNISTDataModule` -> "mnist": the class name, lower case,
    without "DataModule"."""
    name = type(datamodule).__name__
    name = name[: -len("DataModule")] if name.endswith("DataModule") and name != "DataModule" else name
    return name.lower()


class DomainFeatureNet(nn.Module):
    """Convnet classifier for (C, H, W) images; `forward` returns its penultimate features.

    conv3x3(C, 32) -> conv3x3/2(32, 64) -> conv3x3(64, 64) -> avg-pool to 4x4 -> linear(1024, 64)
    -> ReLU = features (B, 64); `classify` adds linear(64, num_classes) for training.
    """

    def __init__(self, dims: tuple[int, ...], num_classes: int, num_features: int = 64, feature_name: str = "domain") -> None:
        super().__init__()
        if len(dims) != 3:
            raise ValueError(f"the domain feature extractor needs image dims (C, H, W), got {tuple(dims)}")
        self.dims = tuple(int(d) for d in dims)
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)  # read by torchmetrics' FID
        self.feature_name = feature_name  # the metric is logged as val/fid_<feature_name>
        self.body = nn.Sequential(
            nn.Conv2d(self.dims[0], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_features) penultimate-layer features."""
        return self.body(x)

    def classify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.head(self.body(x))


@contextmanager
def _nondeterministic() -> Iterator[None]:
    """PyTorch's deterministic-algorithms mode off inside the block, the caller's setting after."""
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def _batches(loader: Any) -> Any:
    """(x, y) pairs of a loader of `(x, y, ...)` batches."""
    return ((batch[0], batch[1]) for batch in loader)


def train_domain_features(
    datamodule: L.LightningDataModule, steps: int = 500, lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[DomainFeatureNet, float | None]:
    """Train a `DomainFeatureNet` on `datamodule.train_dataloader()` for `steps` Adam steps.

    Runs under `torch.random.fork_rng`, so the caller's random state is untouched. Returns the
    network (eval mode, no gradients) and its accuracy on the validation split (None if there is none).
    Runs with PyTorch's deterministic-algorithms mode off, whatever the caller set (the adaptive
    pooling's backward has no deterministic CUDA kernel): the network is trained once, saved and
    reused, so the training run's own reproducibility does not depend on it.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), _nondeterministic():
        torch.manual_seed(seed)  # the initial weights too: attaching FID must not move training's random stream
        net = DomainFeatureNet(datamodule.dims, datamodule.num_classes, feature_name=datamodule_feature_name(datamodule))
        net.to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        step = 0
        while step < steps:  # whole passes over the (reshuffled) training loader
            start = step
            for x, y in _batches(datamodule.train_dataloader()):
                loss = F.cross_entropy(net.classify(x.to(device)), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step >= steps:
                    break
            if step == start:
                raise ValueError(f"{type(datamodule).__name__}.train_dataloader() yielded no batches to train the FID features on")
    net.eval().requires_grad_(False)
    return net, _accuracy(net, datamodule, device)


@torch.no_grad()
def _accuracy(net: DomainFeatureNet, datamodule: L.LightningDataModule, device: torch.device) -> float | None:
    try:
        loader = datamodule.val_dataloader()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    correct = total = 0
    for x, y in _batches(loader):
        correct += int((net.classify(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / total if total else None


def save_domain_features(net: DomainFeatureNet, path: str, val_accuracy: float | None = None) -> None:
    """Write the network and what it was trained for; atomic (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = {
        "format": FILE_FORMAT, "dims": list(net.dims), "num_classes": net.num_classes,
        "num_features": net.num_features, "feature_name": net.feature_name, "val_accuracy": val_accuracy,
        "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(record, tmp)
    os.replace(tmp, path)


def load_domain_features(path: str, dims: tuple[int, ...] | None = None, num_classes: int | None = None) -> DomainFeatureNet | None:
    """The saved network, or None when the file is missing or was made for other dims / classes."""
    if not os.path.exists(path):
        return None
    record = torch.load(path, map_location="cpu", weights_only=True)
    if record.get("format") != FILE_FORMAT:
        return None
    if (dims is not None and tuple(record["dims"]) != tuple(dims)) or (num_classes is not None and record["num_classes"] != num_classes):
        return None
    with torch.random.fork_rng(devices=[]):  # the random initial weights are overwritten: leave the caller's stream alone
        net = DomainFeatureNet(tuple(record["dims"]), record["num_classes"], record["num_features"], record["feature_name"])
    net.load_state_dict(record["state_dict"])
    return net.eval().requires_grad_(False)


def load_or_train_domain_features(
    datamodule: L.LightningDataModule, path: str, trainer: L.Trainer | None = None, steps: int = 500, seed: int = 0
) -> DomainFeatureNet:
    """Load the extractor from `path` if it matches the datamodule's dims and num_classes; otherwise
    train it on the training split and save it there. Under DDP only rank 0 trains; the others wait.
    """
    dims, num_classes = tuple(datamodule.dims), int(datamodule.num_classes)
    is_zero = trainer is None or trainer.is_global_zero
    if is_zero and load_domain_features(path, dims, num_classes) is None:
        if os.path.exists(path):
            warnings.warn(f"{path} was made for other data (not dims {dims}, {num_classes} classes); retraining and overwriting it")
        device = trainer.strategy.root_device if trainer is not None else "cpu"
        net, accuracy = train_domain_features(datamodule, steps=steps, seed=seed, device=device)
        save_domain_features(net, path, accuracy)
        acc = "n/a" if accuracy is None else f"{accuracy:.3f}"
        rank_zero_info(f"FID domain features for {net.feature_name}: trained, val accuracy {acc}, saved to {path}")
    if trainer is not None:
        trainer.strategy.barrier("fid_domain_features")
    net = load_domain_features(path, dims, num_classes)
    if net is None:
        raise FileNotFoundError(f"the FID domain feature extractor {path} was not written (is the folder shared by all ranks?)")
    return net


# ---- the feature networks shipped with the package ------------------------------------------------

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED_HASHES = os.path.join(SHIPPED, "SHA256SUMS")
SHIPPED_TRAINING = {"digits": 2000, "mnist": 3000}  # Adam steps of the shipped networks (batch 100, seed 0)


def shipped_features_path(name: str, dims: tuple[int, ...]) -> str:
    """Where the package keeps the feature network of data set `name` with image `dims`."""
    return os.path.join(SHIPPED, f"fid_{name}_{'x'.join(map(str, dims))}.pt")


def load_shipped_features(name: str, dims: tuple[int, ...], num_classes: int) -> DomainFeatureNet | None:
    """The shipped network for (name, dims), checked against its recorded SHA-256; None if the package
    has none. The same weights in every checkout and on every machine: FIDs comparable across them."""
    path = shipped_features_path(name, dims)
    if not os.path.exists(path):
        return None
    with open(SHIPPED_HASHES) as handle:
        recorded = dict(line.split()[::-1] for line in handle if line.strip())
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if recorded.get(os.path.basename(path)) != digest:
        raise ValueError(
            f"The shipped FID feature network {path} does not match its SHA-256 in {SHIPPED_HASHES} "
            f"({digest}): the file is damaged or was changed. Restore it (git checkout), or retrain it with "
            f"python -m callbacks.train_features {name}."
        )
    return load_domain_features(path, dims, num_classes)
