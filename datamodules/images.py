"""Reading image files that may be damaged: one clear error that names the file and the fix, or the
unreadable files left out (counted and reported) when the datamodule is asked to skip them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

SKIP_FIX = "--data.init_args.skip_bad_files true leaves unreadable files out (counted and reported)"


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (truncated, damaged, or not an image)."""


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """The fully decoded image at `path` in `mode`, or UnreadableImageError naming the file and the fix."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # decodes the whole file: a truncated one fails here, not later
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(
            f"cannot read the image {path} ({type(err).__name__}: {err}). Replace or remove the file, or pass "
            f"{SKIP_FIX}."
        ) from err


def readable(path: str | Path) -> bool:
    """Whether `path` decodes as an image."""
    try:
        read_image(path)
        return True
    except UnreadableImageError:
        return False


def keep_readable(paths: Sequence[str | Path], what: str, threads: int = 8) -> list[str | Path]:
    """The paths that decode (decoded in `threads` threads: PIL releases the GIL), with a warning that
    counts and names the others."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        flags = list(pool.map(readable, paths))
    bad = [p for p, ok in zip(paths, flags) if not ok]
    if bad:
        rank_zero_warn(
            f"{what}: left out {len(bad)} unreadable image file(s) of {len(paths)} "
            f"(skip_bad_files=True): {', '.join(str(p) for p in bad[:5])}{' ...' if len(bad) > 5 else ''}"
        )
    return [p for p, ok in zip(paths, flags) if ok]
