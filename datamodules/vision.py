"""Real image datasets on disk: MNIST, Fashion-MNIST, CIFAR-10 and CelebA.

MNIST, Fashion-MNIST and CIFAR-10 are read by torchvision's own dataset classes, so the files
are the official ones, in the official layout under ``data_dir``:

- ``MNIST/raw/`` and ``FashionMNIST/raw/``: the four uncompressed idx files;
- ``cifar-10-batches-py/``: the pickled ``data_batch_1..5``, ``test_batch`` and ``batches.meta``;
- ``celeba/``: ``img_align_celeba/*.jpg`` (178x218 aligned faces) and ``list_eval_partition.txt``.

Their official test split is the test split; validation is carved from the training split with
``val_fraction`` and ``seed``. CelebA uses its own partition file (0 train, 1 valid, 2 test) and
the WAE paper's preprocessing: centre crop 140x140, resize to 64x64. All images are scaled to
[-1, 1]; CelebA is read lazily, one file per sample.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets import utils as tv_utils

from datamodules.base import BaseDataModule, image_transform, split_dataset
from datamodules.images import keep_readable, read_image


class _MNISTLike(BaseDataModule):
    """MNIST-format data (28x28 grey, 10 classes) through the torchvision class ``dataset_class``.

    Args:
        data_dir: root folder; the idx files live in ``<data_dir>/<dataset>/raw/``.
        download: download the missing files in ``prepare_data`` (needs internet).
        batch_size, num_workers, val_fraction, seed: see ``BaseDataModule``.
    """

    dataset_class: type[datasets.MNIST]
    expected_files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    dims = (1, 28, 28)
    num_classes = 10

    @property
    def dataset_folder(self) -> Path:
        return self.root / self.dataset_class.__name__ / "raw"  # where torchvision looks

    def _download(self) -> None:
        self.dataset_class(str(self.root), train=True, download=True)

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        transform = image_transform(1)
        full = self.dataset_class(str(self.root), train=True, transform=transform)
        test = self.dataset_class(str(self.root), train=False, transform=transform)
        train, val = split_dataset(full, [self.val_fraction], self.seed)
        return train, val, test


class MNISTDataModule(_MNISTLike):
    """MNIST handwritten digits, (1, 28, 28) in [-1, 1], 60000 train (minus val) / 10000 test."""

    name = "MNIST"
    dataset_class = datasets.MNIST


class FashionMNISTDataModule(_MNISTLike):
    """Fashion-MNIST clothing images, (1, 28, 28) in [-1, 1], 60000 train (minus val) / 10000 test."""

    name = "Fashion-MNIST"
    dataset_class = datasets.FashionMNIST


class _CIFAR10Present(datasets.CIFAR10):
    """torchvision's CIFAR10 that checks its files are present, not their md5 sums.

    torchvision compares each batch file and ``batches.meta`` with the md5 of the official
    release, which rejects any other file in the same format (the tests write tiny ones). With
    the md5 entries set to ``None``, ``check_integrity`` only checks that the file exists. The
    md5 of a downloaded archive (``tgz_md5``) is still checked.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10, (3, 32, 32) in [-1, 1], 50000 train (minus val) / 10000 test, 10 classes.

    Args:
        data_dir: root folder; the batches live in ``<data_dir>/cifar-10-batches-py/``.
        download: download and extract the archive in ``prepare_data`` (needs internet).
        batch_size, num_workers, val_fraction, seed: see ``BaseDataModule``.
    """

    name = "CIFAR-10"
    expected_files = tuple(f"data_batch_{k}" for k in range(1, 6)) + ("test_batch", "batches.meta")

    dims = (3, 32, 32)
    num_classes = 10

    @property
    def dataset_folder(self) -> Path:
        return self.root / _CIFAR10Present.base_folder

    def _download(self) -> None:
        _CIFAR10Present(str(self.root), train=True, download=True)

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        transform = image_transform(3)
        full = _CIFAR10Present(str(self.root), train=True, transform=transform)
        test = _CIFAR10Present(str(self.root), train=False, transform=transform)
        train, val = split_dataset(full, [self.val_fraction], self.seed)
        return train, val, test


CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}  # codes of list_eval_partition.txt
CELEBA_CROP, CELEBA_SIZE = 140, 64  # WAE paper: centre crop 140x140 of 178x218, resize to 64x64


def read_celeba_partition(path: Path) -> dict[int, list[str]]:
    """Parse ``list_eval_partition.txt`` (lines ``000001.jpg 0``) into ``{code: [file names]}``."""
    parts: dict[int, list[str]] = {code: [] for code in CELEBA_PARTITIONS.values()}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}, line {line_no}: expected '<image>.jpg <0|1|2>', got {line!r}")
        parts[int(fields[1])].append(fields[0])
    return parts


class CelebAImages(Dataset):
    """Aligned CelebA images read lazily from ``folder``; the label is always 0 (no classes)."""

    def __init__(self, folder: Path, filenames: list[str], transform: transforms.Compose) -> None:
        self.folder = folder
        self.filenames = filenames
        self.transform = transform

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, index: int):
        return self.transform(read_image(self.folder / self.filenames[index])), 0  # x: (3, 64, 64)


class CelebADataModule(BaseDataModule):
    """CelebA aligned faces, (3, 64, 64) in [-1, 1], split by CelebA's own partition file.

    Args:
        data_dir: root folder; the files live in ``<data_dir>/celeba/``.
        download: try torchvision's Google Drive download in ``prepare_data`` (needs internet and
            the ``gdown`` package; often refused for quota, so placing the files is the sure way).
        batch_size, num_workers, seed: see ``BaseDataModule``.
        skip_bad_files: decode every image at setup and leave out the unreadable ones (counted and
            named in a warning); False: a damaged file stops the run with an error naming it.

    Batches are ``(x, y)`` with ``y = 0``: this datamodule reads no attributes or identities.
    """

    name = "CelebA"
    data_folder_name = "celeba"
    image_folder_name = "img_align_celeba"
    partition_file = "list_eval_partition.txt"
    expected_files = (image_folder_name + "/", partition_file)
    download_fix = (
        "place the files there (unzip img_align_celeba.zip there, from "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html); CelebA has no reliable automatic download: "
        "--data.download true tries torchvision's Google Drive link, needs gdown and is often refused"
    )
    download_note = (
        " CelebA has no reliable automatic download (Google Drive quotas): get img_align_celeba.zip and "
        "list_eval_partition.txt from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and unzip the "
        "images there."
    )

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 100,
        num_workers: int | None = None,
        seed: int = 0,
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__(data_dir, download, batch_size, num_workers, seed=seed)
        self.save_hyperparameters()
        self.skip_bad_files = skip_bad_files
        self.dims = (3, CELEBA_SIZE, CELEBA_SIZE)
        self.num_classes = None

    @property
    def dataset_folder(self) -> Path:
        return self.root / self.data_folder_name

    def _download(self) -> None:
        folder = self.dataset_folder
        wanted = ("img_align_celeba.zip", self.partition_file)
        for file_id, md5, filename in datasets.CelebA.file_list:
            if filename in wanted:
                tv_utils.download_file_from_google_drive(file_id, str(folder), filename, md5)
        tv_utils.extract_archive(str(folder / "img_align_celeba.zip"))

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        folder = self.dataset_folder
        parts = read_celeba_partition(folder / self.partition_file)
        image_dir = folder / self.image_folder_name
        present = {p.name for p in image_dir.iterdir()}
        absent = [name for names in parts.values() for name in names if name not in present]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} images listed in {folder / self.partition_file} are missing from {image_dir} "
                f"(first: {', '.join(absent[:3])}); fix: unzip the complete img_align_celeba.zip there."
            )
        if self.skip_bad_files:  # decoded once here, so that no batch meets a damaged file
            kept = set(keep_readable([image_dir / n for names in parts.values() for n in names], f"CelebA ({image_dir})"))
            parts = {code: [n for n in names if image_dir / n in kept] for code, names in parts.items()}
        transform = image_transform(3, transforms.CenterCrop(CELEBA_CROP), transforms.Resize(CELEBA_SIZE))
        train, val, test = (CelebAImages(image_dir, parts[c], transform) for c in CELEBA_PARTITIONS.values())
        return train, val, test
