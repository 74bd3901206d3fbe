"""Tests of datamodules/: real loading code on tiny files written in each dataset's own format.

No test touches the network: downloads are replaced by functions that raise ``URLError``.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image

from datamodules import (
    BaseDataModule,
    CelebADataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    GaussianMixtureDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from datamodules.images import UnreadableImageError
from cli.command import main
from helpers import mnist_pixels, write_mnist

ALL_CLASSES = [CelebADataModule, CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule,
               GaussianMixtureDataModule, ImageFolderDataModule, MNISTDataModule]


def to_unit(v) -> torch.Tensor:
    """uint8 pixel value(s) -> the [-1, 1] value the datamodules produce."""
    return torch.as_tensor(v, dtype=torch.float32) * (2 / 255) - 1


def check_batches(dm: BaseDataModule) -> None:
    """Every dataloader yields (x, y): x float32 (B, *dims), y int64 (B,)."""
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape[1:] == dm.dims
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        if dm.data_range is not None:
            assert x.min() >= dm.data_range[0] - 1e-6 and x.max() <= dm.data_range[1] + 1e-6


def stack(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def forbid_download(monkeypatch, target: str) -> None:
    """Replace the download function ``target`` by one that fails as it does offline."""
    def no_network(*args, **kwargs):
        raise URLError("no network in tests")
    monkeypatch.setattr(target, no_network)


# ---- file writers in the real on-disk formats ----------------------------------------------

def cifar_pixels(start: int, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows (R plane, G plane, B plane), pixel value (7 * image + position) % 256."""
    return ((7 * np.arange(start, start + n)[:, None] + np.arange(3072)) % 256).astype(np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> None:
    """cifar-10-batches-py/ with pickled data_batch_1..5, test_batch and batches.meta.

    The official files are Python 2 pickles whose str keys torchvision reads with
    ``encoding="latin1"`` as str ("data", "labels"), so str keys are the same format to it.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [(f"data_batch_{k + 1}", k * per_batch, per_batch) for k in range(5)]
    for name, start, n in batches + [("test_batch", 1000, n_test)]:
        entry = {"data": cifar_pixels(start, n), "labels": [(start + i) % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


CELEBA_PARTITION = [0, 0, 0, 1, 1, 2]


def write_celeba(root: Path) -> None:
    """celeba/img_align_celeba/00000k.jpg (178x218) and celeba/list_eval_partition.txt.

    Each image is green with the central 140x140 crop (left 19, top 39) in red.
    """
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lines = []
    for k, part in enumerate(CELEBA_PARTITION, start=1):
        img = Image.new("RGB", (178, 218), (0, 255, 0))
        img.paste((255, 0, 0), (19, 39, 19 + 140, 39 + 140))
        img.save(folder / "img_align_celeba" / f"{k:06d}.jpg", quality=95)
        lines.append(f"{k:06d}.jpg {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def write_image_folder(root: Path) -> None:
    """Two class folders of PNGs of different sizes, each image one grey level."""
    for cls, sizes in (("cats", [(40, 30), (20, 50), (33, 33)]), ("dogs", [(64, 48), (25, 25)])):
        (root / cls).mkdir(parents=True)
        for k, size in enumerate(sizes):
            level = 40 * k + (100 if cls == "dogs" else 0)
            Image.new("RGB", size, (level, level, level)).save(root / cls / f"{k}.png")


# ---- argument checks and CLI visibility ----------------------------------------------------

@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_signature_is_visible_to_the_cli(cls, tmp_path):
    params = inspect.signature(cls.__init__).parameters.values()
    assert all(p.kind != p.VAR_KEYWORD and p.kind != p.VAR_POSITIONAL for p in params)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.batch_size", "7", "--data.seed", "3"]
                            + (["--data.data_dir", str(tmp_path)] if cls is ImageFolderDataModule else []))
    assert cfg.data.batch_size == 7 and cfg.data.seed == 3


def test_init_needs_no_data_and_saves_hyperparameters(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "absent"), batch_size=7)
    assert dm.dims == (1, 28, 28) and dm.num_classes == 10 and dm.data_range == (-1.0, 1.0)
    assert dm.hparams.batch_size == 7 and dm.hparams.data_dir == str(tmp_path / "absent")
    assert CIFAR10DataModule().dims == (3, 32, 32) and CelebADataModule().dims == (3, 64, 64)
    assert ImageFolderDataModule(str(tmp_path), image_size=16, channels=1).dims == (1, 16, 16)


@pytest.mark.parametrize("make, match", [
    (lambda: DigitsDataModule(batch_size=0), "batch_size"),
    (lambda: DigitsDataModule(val_fraction=1.0), "val_fraction"),
    (lambda: DigitsDataModule(test_fraction=-0.1), "test_fraction"),
    (lambda: DigitsDataModule(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction"),
    (lambda: DigitsDataModule(image_size=0), "image_size"),
    (lambda: MNISTDataModule(num_workers=-1), "num_workers"),
    (lambda: ImageFolderDataModule("x", channels=2), "channels must be 1 .* or 3"),
    (lambda: GaussianMixtureDataModule(std=0.0), "std"),
    (lambda: GaussianMixtureDataModule(num_val_samples=-1), "num_val_samples"),
    (lambda: GaussianMixtureDataModule(layout="grid", num_modes=8), "perfect square"),
])
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_dataloader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# ---- embedded data: digits and Gaussian mixtures ---------------------------------------------

def test_digits_range_splits_and_batches():
    dm = DigitsDataModule(batch_size=64)
    assert dm.dims == (1, 8, 8) and dm.num_classes == 10
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [1437, 180, 180] and sum(sizes) == 1797
    x, y = stack(dm.train_dataloader())
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    check_batches(dm)


def test_digits_split_and_shuffle_are_deterministic():
    def val_and_first_batch(seed):
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return stack(dm.val_dataloader())[0], next(iter(dm.train_dataloader()))[0]
    val_a, batch_a = val_and_first_batch(0)
    val_b, batch_b = val_and_first_batch(0)
    val_c, batch_c = val_and_first_batch(1)
    assert torch.equal(val_a, val_b) and torch.equal(batch_a, batch_b)
    assert not torch.equal(val_a, val_c) and not torch.equal(batch_a, batch_c)
    dm = DigitsDataModule()
    dm.setup()
    in_order = torch.stack([dm.train_set[i][0] for i in range(100)])
    assert not torch.equal(batch_a, in_order)  # the training loader shuffles


def test_digits_resize():
    dm = DigitsDataModule(image_size=28, batch_size=10)
    assert dm.dims == (1, 28, 28)
    dm.setup()
    check_batches(dm)


def test_ring_centres_and_component_std():
    dm = GaussianMixtureDataModule(layout="ring", num_modes=8, radius=2.0, std=0.05, num_samples=8000)
    assert dm.dims == (2,) and dm.num_classes == 8 and dm.data_range is None
    assert dm.centers.shape == (8, 2)
    torch.testing.assert_close(dm.centers.norm(dim=1), torch.full((8,), 2.0))
    angles = torch.atan2(dm.centers[:, 1], dm.centers[:, 0]).remainder(2 * torch.pi).sort().values
    torch.testing.assert_close(angles, torch.arange(8) * (torch.pi / 4), atol=1e-6, rtol=0)
    dm.setup()
    x, y = stack(dm.train_dataloader())
    assert len(x) == 8000
    for k in range(8):
        dev = x[y == k] - dm.centers[k]  # (n_k, 2)
        assert abs(dev.std().item() - dm.std) < 0.1 * dm.std
    check_batches(dm)


def test_grid_layout():
    dm = GaussianMixtureDataModule(layout="grid", num_modes=25, radius=2.0)
    assert dm.centers.shape == (25, 2) and dm.num_classes == 25
    ticks = torch.linspace(-2, 2, 5)
    for axis in range(2):
        torch.testing.assert_close(dm.centers[:, axis].unique(), ticks)


def test_unknown_layout_lists_valid_ones():
    with pytest.raises(ValueError, match="spiral") as info:
        GaussianMixtureDataModule(layout="spiral")
    assert "ring" in str(info.value) and "grid" in str(info.value)


def test_mixture_splits_are_seeded_and_independent():
    def val(**kw):
        dm = GaussianMixtureDataModule(num_val_samples=50, **kw)
        dm.setup()
        return dm.val_set.tensors[0]
    assert torch.equal(val(seed=0), val(seed=0, num_samples=123))
    assert not torch.equal(val(seed=0), val(seed=1))


# ---- on-disk datasets through the real loaders ----------------------------------------------

@pytest.mark.parametrize("cls, folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_mnist_like_idx_files(cls, folder, tmp_path):
    write_mnist(tmp_path, folder)
    dm = cls(data_dir=str(tmp_path), val_fraction=0.25, batch_size=8)
    dm.prepare_data()
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [15, 5, 10]
    x, y = dm.test_set[3]  # the official test split, in file order
    assert x.shape == (1, 28, 28) and y == 3
    torch.testing.assert_close(x[0], to_unit(mnist_pixels(10, 100)[3]))
    i = dm.val_set.indices[0]  # validation is carved from the training file
    torch.testing.assert_close(dm.val_set[0][0][0], to_unit(mnist_pixels(20, 0)[i]))
    assert dm.val_set[0][1] == i % 10
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    check_batches(dm)


def test_cifar10_pickled_batches(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.2, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [16, 4, 6]
    x, y = dm.test_set[2]
    expected = to_unit(cifar_pixels(1000, 6)[2].reshape(3, 32, 32))  # (C, H, W) planes
    torch.testing.assert_close(x, expected)
    assert y == 1002 % 10
    check_batches(dm)


def test_celeba_crop_resize_and_partitions(tmp_path):
    write_celeba(tmp_path)
    dm = CelebADataModule(data_dir=str(tmp_path), batch_size=2)
    assert dm.num_classes is None
    dm.prepare_data()
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [3, 2, 1]
    x, y = dm.test_set[0]
    assert x.shape == (3, 64, 64) and y == 0
    means = x.mean(dim=(1, 2))  # (3,): the crop keeps only the red centre (JPEG: loose check)
    assert means[0] > 0.9 and means[1] < -0.9 and means[2] < -0.9
    check_batches(dm)


def test_celeba_image_missing_from_partition_is_named(tmp_path):
    write_celeba(tmp_path)
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        CelebADataModule(data_dir=str(tmp_path)).setup()


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(channels, tmp_path):
    write_image_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, channels=channels, val_fraction=0.2,
                               test_fraction=0.2, batch_size=2)
    assert dm.dims == (channels, 16, 16)
    dm.setup()
    assert dm.num_classes == 2
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [3, 1, 1]
    full = dm.train_set.dataset
    for k, (path, label) in enumerate(full.samples):
        level = Image.open(path).getpixel((0, 0))[0]
        x, y = full[k]
        assert y == label and x.shape == (channels, 16, 16)
        torch.testing.assert_close(x, to_unit(level).expand(channels, 16, 16))
    check_batches(dm)


# ---- damaged image files --------------------------------------------------------------------

def truncate(path: Path) -> None:
    """Cut a JPEG in half, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_jpeg_is_named_with_the_fix_or_skipped(tmp_path, capsys):
    root, tmp_path = tmp_path, tmp_path / "images"  # the run directory must not become a class folder
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (40, 40), (50 * k, 80, 120)).save(tmp_path / cls / f"{k}.jpg", quality=95)
    truncate(tmp_path / "dogs" / "1.jpg")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, val_fraction=0.0, test_fraction=0.0, batch_size=6)
    dm.setup()
    with pytest.raises(UnreadableImageError, match=r"dogs/1\.jpg.*--data\.init_args\.skip_bad_files true"):
        stack(dm.train_dataloader())
    args = ["fit", "--model", "WAE", "--model.width", "8", "--data", "ImageFolderDataModule", "--data.data_dir", str(tmp_path),
            "--data.image_size", "16", "--data.val_fraction", "0", "--data.test_fraction", "0", "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.default_root_dir", str(root / "run"),
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 2  # through the CLI: one message, no traceback
    err = capsys.readouterr().err
    assert "UnreadableImageError" in err and "dogs/1.jpg" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match=r"left out 1 unreadable image file\(s\) of 6 .*dogs/1\.jpg"):
        skipping = ImageFolderDataModule(str(tmp_path), image_size=16, val_fraction=0.0, test_fraction=0.0,
                                         batch_size=6, skip_bad_files=True)
        skipping.setup()
    assert stack(skipping.train_dataloader())[0].shape == (5, 3, 16, 16)


def test_a_truncated_celeba_image_is_named_or_skipped(tmp_path):
    write_celeba(tmp_path)
    truncate(tmp_path / "celeba" / "img_align_celeba" / "000004.jpg")  # in the validation partition
    dm = CelebADataModule(data_dir=str(tmp_path), batch_size=2)
    dm.setup()
    with pytest.raises(UnreadableImageError, match="000004.jpg"):
        stack(dm.val_dataloader())
    with pytest.warns(UserWarning, match=r"left out 1 unreadable image file\(s\) of 6"):
        skipping = CelebADataModule(data_dir=str(tmp_path), batch_size=2, skip_bad_files=True)
        skipping.setup()
    assert [len(skipping.train_set), len(skipping.val_set), len(skipping.test_set)] == [3, 1, 1]


# ---- offline behaviour --------------------------------------------------------------------

ON_DISK = [
    (lambda d, dl: MNISTDataModule(data_dir=d, download=dl), "MNIST/raw"),
    (lambda d, dl: FashionMNISTDataModule(data_dir=d, download=dl), "FashionMNIST/raw"),
    (lambda d, dl: CIFAR10DataModule(data_dir=d, download=dl), "cifar-10-batches-py"),
    (lambda d, dl: CelebADataModule(data_dir=d, download=dl), "celeba"),
]


@pytest.mark.parametrize("make, folder", ON_DISK)
@pytest.mark.parametrize("hook", ["prepare_data", "setup"])
def test_missing_data_names_folder_and_fix(make, folder, hook, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = make("data", False)  # a relative data_dir: the message names the absolute folder
    with pytest.raises(FileNotFoundError) as info:
        getattr(dm, hook)()
    message = str(info.value)
    assert str(tmp_path.resolve() / "data" / folder) in message
    assert "--data.download" in message and "--data.data_dir" in message


def test_missing_image_folder_names_folder(tmp_path):
    (tmp_path / "empty_class").mkdir()  # a class folder without images is no data
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(str(tmp_path)).setup()
    assert str(tmp_path.resolve()) in str(info.value) and "--data.data_dir" in str(info.value)


@pytest.mark.parametrize("make, folder, download_fn", [
    (ON_DISK[0][0], "MNIST/raw", "torchvision.datasets.mnist.download_and_extract_archive"),
    (ON_DISK[1][0], "FashionMNIST/raw", "torchvision.datasets.mnist.download_and_extract_archive"),
    (ON_DISK[2][0], "cifar-10-batches-py", "torchvision.datasets.cifar.download_and_extract_archive"),
    (ON_DISK[3][0], "celeba", "torchvision.datasets.utils.download_file_from_google_drive"),
])
def test_failed_download_says_where_to_put_the_files(make, folder, download_fn, tmp_path, monkeypatch):
    forbid_download(monkeypatch, download_fn)
    dm = make(str(tmp_path), True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path.resolve() / folder) in message and "by hand" in message
    assert "no network in tests" in message and info.value.__cause__ is not None
    if folder == "celeba":
        assert "no reliable automatic download" in message


def test_download_true_with_files_present_does_not_download(tmp_path, monkeypatch):
    forbid_download(monkeypatch, "torchvision.datasets.mnist.download_and_extract_archive")
    write_mnist(tmp_path, "MNIST")
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.test_set) == 10
