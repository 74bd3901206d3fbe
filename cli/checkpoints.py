"""Checkpoint files for the CLI: a readable-checkpoint check with one clear message per failure,
`--ckpt_path last` resolved to the newest `last.ckpt` of the logger's version folders, and an
atomic writer."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info


class CheckpointFileError(ValueError):
    """A `--ckpt_path` file that is not a readable Lightning checkpoint."""


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise a clear error unless `path` is a readable Lightning checkpoint.

    Distinguishes a missing path, a folder, an empty file, a truncated file (a zip archive, the
    format of `torch.save`, without its index), bytes that torch cannot read at all, and a torch
    file without a `state_dict` (plain weights). Zip files are opened with `mmap`, so the check
    reads the metadata only, not the tensors.
    """
    p = Path(path)
    fix = "Pass a .ckpt file written by training (<save_dir>/<name>/version_N/checkpoints/*.ckpt), or `last`."
    if not p.exists():
        raise FileNotFoundError(f"--ckpt_path {p}: no such file. {fix}")
    if p.is_dir():
        found = sorted(q.name for q in p.rglob("*.ckpt"))[:3]
        inside = f" (it holds {', '.join(found)})" if found else ""
        raise IsADirectoryError(f"--ckpt_path {p} is a folder{inside}. {fix}")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"--ckpt_path {p} is empty (0 bytes): its write or copy was interrupted. {fix}")
    with open(p, "rb") as f:
        head = f.read(8)
    is_zip = head.startswith(b"PK")  # torch.save writes zip archives (since torch 1.6)
    if not is_zip and not head.startswith(b"\x80"):  # nor a pickle: torch's legacy format
        raise CheckpointFileError(
            f"--ckpt_path {p} ({size} bytes) is not a checkpoint: torch.save files are zip archives (they start "
            f"with b'PK') or pickles, and this file starts with {head!r}. {fix}"
        )
    if is_zip and not zipfile.is_zipfile(p):
        raise CheckpointFileError(
            f"--ckpt_path {p} ({size} bytes) is a truncated or damaged checkpoint: it starts as a torch.save "
            "archive but the archive's index at its end is missing, so the file was cut short (an interrupted "
            f"write or copy). Copy it again, or use an earlier checkpoint. {fix}"
        )
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # noqa: BLE001  (torch raises many types here; all mean "cannot read it")
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointFileError(f"--ckpt_path {p} ({size} bytes) cannot be read by torch.load: {reason.rstrip('.')}. {fix}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:4])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointFileError(
            f"--ckpt_path {p} is a torch file but not a Lightning checkpoint: it has no 'state_dict' (it holds "
            f"{keys}). Plain weights (torch.save(model.state_dict())) load with model.load_state_dict(...) in "
            f"Python, not through --ckpt_path. {fix}"
        )


def check_checkpoint_class(path: str | os.PathLike, class_path: str) -> None:
    """Raise a clear error when the checkpoint holds another model class than the config builds
    (Lightning would otherwise build the checkpoint's class and fail later, naming neither)."""
    hyperparameters = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    saved = hyperparameters.get("_class_path")
    if saved and saved.rsplit(".", 1)[-1] != class_path.rsplit(".", 1)[-1]:
        raise ValueError(
            f"--ckpt_path {path} holds a {saved.rsplit('.', 1)[-1]} ({saved}), but the config builds a "
            f"{class_path.rsplit('.', 1)[-1]} ({class_path}). Pass the config the checkpoint was trained with "
            f"(--model {saved.rsplit('.', 1)[-1]} or its configs/*.yaml), or a checkpoint of a "
            f"{class_path.rsplit('.', 1)[-1]}."
        )


def newest_last_checkpoint(log_root: Path) -> tuple[Path, int] | None:
    """The most recently written last*.ckpt under `log_root`/version_N/checkpoints, with its N."""
    found = []
    for folder in log_root.glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", folder.name)
        if match:
            for ckpt in (folder / "checkpoints").glob("last*.ckpt"):
                if re.fullmatch(r"last(-v?\d+)?\.ckpt", ckpt.name):
                    found.append((ckpt.stat().st_mtime, int(match.group(1)), ckpt))
    if not found:
        return None
    _, version, ckpt = max(found)
    return ckpt, version


LOGGERS_WITH_VERSIONS = ("TensorBoardLogger", "CSVLogger", "RunLogger")  # log dirs <save_dir>/<name>/version_N


def resolve_last(subcommand: str, config: Any) -> None:
    """`--ckpt_path last` -> the newest last.ckpt of the logger's version folders (see the module
    docstring). Left to Lightning when checkpoints do not go to the logger's folder."""
    logger = config.get("trainer", {}).get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    class_path = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
    if not class_path.endswith(LOGGERS_WITH_VERSIONS):
        return
    init_args = logger.get("init_args")
    if init_args is None or init_args.get("version") is not None:
        return
    for callback in config.get("trainer", {}).get("callbacks") or []:
        args = callback.get("init_args") if hasattr(callback, "get") else None
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and args and args.get("dirpath"):
            return  # an explicit checkpoint folder: Lightning's own "last" looks there
    root = Path(init_args.get("save_dir") or config.get("trainer", {}).get("default_root_dir") or ".")
    root = root / (init_args.get("name") or "")
    found = newest_last_checkpoint(root)
    if found is None:
        if subcommand != "fit":
            raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints to {subcommand}. "
                                    "Pass --ckpt_path PATH to a checkpoint file.")
        rank_zero_info(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints yet; training starts from scratch.")
        config["ckpt_path"] = None
        return
    ckpt, version = found
    config["ckpt_path"] = str(ckpt)
    if subcommand == "fit":
        init_args["version"] = version  # logs and checkpoints continue in the same folder
    rank_zero_info(f"--ckpt_path last: {ckpt}" + (f" (logging continues in version_{version})" if subcommand == "fit" else ""))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint completely or not at all, on the checkpoint's own filesystem.

    Lightning's default (`_atomic_save`, an fsspec transaction) writes a temporary file in the
    system temp folder and moves it over the target: a rename when that folder is on the same
    filesystem, but a copy into the truncated target when it is not (a node-local /tmp and a
    shared checkpoint folder), so a crash during that copy destroys the previous checkpoint
    (tests/test_resume.py shows both). Here the temporary file sits beside the target, is
    flushed to disk, then renamed over it (`os.replace`, atomic on POSIX); temporary files of a
    killed writer are removed at the next save of the same file. Remote URLs go to Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        text = str(path)
        if storage_options is not None or ("://" in text and not text.startswith("file://")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(text.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # one writer per file: leftovers of a crash
            stale.unlink(missing_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            folder = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:
            pass  # some filesystems cannot fsync a folder; the file itself is on disk

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load the checkpoint every process resumes from: rank 0's file.

        Each process resolves `--ckpt_path` (`last` included) on its own disk before the process
        group exists, so nodes without shared storage could pick different files. Here, with the
        group up, every rank takes rank 0's path; a rank that does not have that file, or whose file
        is another step of training, stops with a message naming both.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().load_checkpoint(path, *args, **kwargs)
        chosen = [str(path)]
        dist.broadcast_object_list(chosen, src=0)
        local = chosen[0].removeprefix("file://")
        present = [None] * dist.get_world_size()  # every rank learns who lacks the file: all stop together
        dist.all_gather_object(present, "://" in local or Path(local).is_file())
        if not all(present):
            lacking = [rank for rank, has in enumerate(present) if not has]
            raise FileNotFoundError(
                f"Rank(s) {lacking} cannot resume from {chosen[0]}, the checkpoint rank 0 resolved (rank "
                f"{dist.get_rank()} resolved {path}): the nodes do not share the checkpoint folder. Put the run "
                "folder on storage every node sees, or copy the checkpoint to the same path on every node and "
                "pass --ckpt_path FILE."
            )
        checkpoint = super().load_checkpoint(chosen[0], *args, **kwargs)
        position = [(checkpoint.get("global_step"), checkpoint.get("epoch"))]
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, position[0])
        if len(set(positions)) > 1:
            raise ValueError(
                f"The ranks loaded different checkpoints from {chosen[0]} (global step, epoch per rank: {positions}): "
                "the file differs between nodes. Put the run folder on storage every node sees, or copy rank 0's "
                "checkpoint to every node."
            )
        return checkpoint
