"""Any folder of images with one subfolder per class, through torchvision's ``ImageFolder``.

Layout: ``<data_dir>/<class name>/<image>`` (png, jpg, ...). Each image is resized so that its
shorter side is ``image_size``, centre-cropped to ``image_size x image_size``, converted to grey
(``channels=1``) or RGB (``channels=3``) and scaled to [-1, 1]. Labels are the class folder
indices in sorted order. Validation and test sets are drawn from the same folder with
``val_fraction``, ``test_fraction`` and ``seed``.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from datamodules.base import (
    BaseDataModule,
    check_positive,
    check_val_test_fractions,
    image_transform,
    split_dataset,
)
from datamodules.images import keep_readable, read_image


def has_class_folder_with_images(folder: Path) -> bool:
    """Whether ``folder`` has at least one subfolder that directly holds an image file."""
    if not folder.is_dir():
        return False
    return any(
        f.suffix.lower() in IMG_EXTENSIONS
        for sub in folder.iterdir() if sub.is_dir()
        for f in sub.iterdir()
    )


class ImageFolderDataModule(BaseDataModule):
    """Images from class subfolders of ``data_dir``, as ``(channels, image_size, image_size)``.

    Args:
        data_dir: the folder that holds one subfolder per class.
        image_size: side of the square images after resize and centre crop.
        channels: 1 (grey) or 3 (RGB).
        batch_size, num_workers, val_fraction, seed: see ``BaseDataModule``.
        test_fraction: share of the images held out for testing, in [0, 1).
        skip_bad_files: decode every image at setup and leave out the unreadable ones (counted and
            named in a warning); False: a damaged file stops the run with an error naming it.

    ``num_classes`` is known once ``setup`` has read the folder (``None`` before). There is
    nothing to download: ``download`` is not an argument.
    """

    name = "image folder"
    expected_files = ("<class name>/<image>.png|.jpg|... (one subfolder per class)",)
    download_fix = "place one subfolder per class, holding its images, there (an image folder has no download)"

    def __init__(
        self,
        data_dir: str,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 100,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__(data_dir, False, batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters()
        check_positive("image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        check_val_test_fractions(val_fraction, test_fraction)
        self.image_size = image_size
        self.channels = channels
        self.test_fraction = test_fraction
        self.skip_bad_files = skip_bad_files
        self.dims = (channels, image_size, image_size)
        self.num_classes = None

    @property
    def dataset_folder(self) -> Path:
        return self.root

    def _missing_files(self) -> list[str]:
        return [] if has_class_folder_with_images(self.root) else list(self.expected_files)

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        resize = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        if self.channels == 1:
            resize.append(transforms.Grayscale(num_output_channels=1))  # the loader gives RGB
        full = datasets.ImageFolder(str(self.root), transform=image_transform(self.channels, *resize), loader=read_image)
        if self.skip_bad_files:  # decoded once here, so that no batch meets a damaged file
            keep = set(keep_readable([path for path, _ in full.samples], f"{type(self).__name__} ({self.root})"))
            full.samples = full.imgs = [sample for sample in full.samples if sample[0] in keep]
            full.targets = [target for _, target in full.samples]
        self.num_classes = len(full.classes)
        train, val, test = split_dataset(full, [self.val_fraction, self.test_fraction], self.seed)
        return train, val, test
