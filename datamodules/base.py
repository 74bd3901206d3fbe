"""What every datamodule shares: argument checks, a seeded split, dataloaders, offline errors.

A datamodule here knows three things before any data is touched (they are set in ``__init__``,
because the CLI links ``data.dims`` into the model when it builds the objects, before ``setup``):

- ``dims``: the shape of one sample, ``(C, H, W)`` for images, ``(2,)`` for 2-D toy data;
- ``num_classes``: the number of label values (``None`` when the data has no classes);
- ``data_range``: ``(-1.0, 1.0)`` for images, ``None`` for unbounded data.

Every batch is a tuple ``(x, y)``: ``x`` float32 of shape ``(B, *dims)``, ``y`` int64 of shape
``(B,)``. Images are scaled to [-1, 1].

Datasets that live on disk describe their files (``dataset_folder``, ``expected_files``) and how
to fetch them (``_download``); the base class turns a missing folder or a failed download into an
error that names the absolute folder and the fix. Those checks run in
``prepare_data`` / ``setup``, never in ``__init__``, so ``--help`` and ``--print_config`` work
without the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision import transforms

IMAGE_RANGE = (-1.0, 1.0)
DOWNLOAD_FIX = "pass --data.download true (needs internet) or place the files there"


def missing_dataset_error(
    folder: Path, name: str, expected: Sequence[str], fix: str, data_dir: str
) -> FileNotFoundError:
    """The one format of every "data not on disk" error: what, where (absolute), which files, the fix."""
    return FileNotFoundError(
        f"{name} data not found in {folder}\n"
        f"  expected there: {', '.join(expected)}\n"
        f"  fix: {fix}; or, if the data is elsewhere, pass --data.data_dir PATH (now {data_dir!r})."
    )


def download_failed_error(folder: Path, name: str, err: BaseException, note: str = "") -> RuntimeError:
    """The error raised (chained ``from err``) when a download was asked for and failed."""
    return RuntimeError(
        f"Downloading {name} into {folder} failed ({type(err).__name__}: {err}).\n"
        f"  fix: without internet, download the files by hand on another machine and place them "
        f"in {folder}, then run again with --data.download false.{note}"
    )


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_val_test_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both are in [0, 1) and leave some training data."""
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def image_transform(channels: int, *before: Callable) -> transforms.Compose:
    """PIL transforms ``before``, then ``ToTensor`` (to [0, 1]) and ``2 x - 1`` (to [-1, 1])."""
    half = [0.5] * channels
    return transforms.Compose([*before, transforms.ToTensor(), transforms.Normalize(half, half)])


def split_dataset(dataset: Dataset, fractions: Sequence[float], seed: int) -> list[Subset]:
    """Split ``dataset`` into ``1 + len(fractions)`` disjoint subsets with a seeded permutation.

    Part ``i + 1`` holds ``round(fractions[i] * n)`` samples, part 0 (train) the rest. The same
    ``(n, fractions, seed)`` gives the same split in every call and every process.
    """
    n = len(dataset)
    sizes = [round(f * n) for f in fractions]
    if sum(sizes) >= n:
        raise ValueError(f"fractions {list(fractions)} leave no training samples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = [], 0
    for size in [n - sum(sizes), *sizes]:
        parts.append(Subset(dataset, perm[start : start + size]))
        start += size
    return parts


class EpochShuffleSampler(RandomSampler):
    """A random order of the training set that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` before every training epoch, so epoch ``e`` always sees
    ``randperm(n)`` drawn from ``seed + e``: a run resumed from a checkpoint replays the same
    order as an uninterrupted one. Being a ``RandomSampler``, it is replaced by Lightning's
    ``DistributedSampler`` (also seeded per epoch) under DDP.
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class BaseDataModule(L.LightningDataModule):
    """Base of all datamodules: seeded splits, ``(x, y)`` batches, offline-friendly errors.

    Args:
        data_dir: root folder of the on-disk datasets (each has its own subfolder below it).
        download: fetch missing files from the internet in ``prepare_data``.
        batch_size: samples per batch, for all three dataloaders.
        num_workers: dataloader worker processes (0 loads in the main process); None (default): 0 on
            CPU, where workers would take cores from training, and for data held in memory; on a GPU,
            workers for data read and decoded from disk (half the CPU cores, at most 8).
        val_fraction: share of the training data held out for validation, in [0, 1).
        seed: seeds the train/val/test split and the training shuffle.

    Subclasses set ``dims``, ``num_classes`` and ``data_range`` (as class attributes when they are
    fixed, else in ``__init__``) and implement
    ``_load_splits``; on-disk datasets also override ``dataset_folder``, ``expected_files`` and
    ``_download``.
    """

    name = "dataset"  # in error messages
    dims: tuple[int, ...]
    num_classes: int | None = None
    data_range: tuple[float, float] | None = IMAGE_RANGE
    in_memory = False  # the data are tensors already: worker processes would only add copies
    expected_files: tuple[str, ...] = ()  # relative to dataset_folder
    download_fix: str = DOWNLOAD_FIX  # the fix named when the files are missing
    download_note: str = ""  # appended to the message of a failed download

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 100,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (chosen for the device), got {num_workers}")
        check_fraction("val_fraction", val_fraction)
        self.data_dir, self.download, self.seed = data_dir, download, seed
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        if "__init__" not in type(self).__dict__:  # subclasses with arguments of their own save them
            self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---- what on-disk subclasses describe -------------------------------------------------

    @property
    def root(self) -> Path:
        """``data_dir`` as an absolute path (error messages name absolute folders)."""
        return Path(self.data_dir).expanduser().resolve()

    @property
    def dataset_folder(self) -> Path | None:
        """The folder whose files are checked; ``None`` for data that needs no files."""
        return None

    def _missing_files(self) -> list[str]:
        """Entries of ``expected_files`` absent from ``dataset_folder``."""
        folder = self.dataset_folder
        if folder is None:
            return []
        return [f for f in self.expected_files if not (folder / f).exists()]

    def _download(self) -> None:
        """Fetch the files into ``dataset_folder`` (on-disk subclasses override this)."""
        raise NotImplementedError(f"{type(self).__name__} cannot download its data")

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Build the (train, val, test) datasets; the files are known to be present."""
        raise NotImplementedError

    # ---- Lightning hooks ----------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check the files; download the missing ones if ``download`` (runs on one process)."""
        if not self._missing_files():
            return
        if self.download:
            try:
                self._download()
            except (OSError, RuntimeError, ImportError) as err:  # URLError is an OSError
                raise download_failed_error(self.dataset_folder, self.name, err, self.download_note) from err
        if self._missing_files():
            raise missing_dataset_error(
                self.dataset_folder, self.name, self.expected_files, self.download_fix, self.data_dir
            )

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once (same split on every process, from ``seed``).

        Under a Trainer, ``prepare_data`` has already run; when called by hand, ``setup``
        runs it first if files are missing, so the same checks and errors apply.
        """
        if self.train_set is not None:
            return
        if self._missing_files():
            self.prepare_data()
        self.train_set, self.val_set, self.test_set = self._load_splits()

    def train_dataloader(self) -> DataLoader:
        """Shuffled in an order fixed by ``seed`` and the epoch (``EpochShuffleSampler``)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def loader_settings(self) -> tuple[int, bool]:
        """(worker processes, pinned memory) for this run's device: see `num_workers`. Batches are
        pinned when they go to a GPU, so that the copy overlaps the step."""
        trainer = getattr(self, "trainer", None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        workers = self.num_workers
        if workers is None:
            workers = 0 if self.in_memory or not on_gpu else min(8, max(1, (os.cpu_count() or 2) // 2))
        return workers, on_gpu

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        workers, pin_memory = self.loader_settings()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed) if shuffle else None,
            # workers' base seed is drawn from this generator, not from the global random state
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            drop_last=False,
        )
