"""The configs' logger: Lightning's TensorBoardLogger, whose folder defaults to the trainer's.

The configs name it without a `save_dir`, and the CLI sets that to `--trainer.default_root_dir`
(`PrimalDualCLI._fill_log_dirs`): logs, checkpoints and images of a run then go under the directory
the user chose, `<default_root_dir>/<name>/version_N`, unless `--trainer.logger.init_args.save_dir`
says otherwise. (Lightning's own logger needs `save_dir` when the config is parsed, before the
trainer's folder is known.)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


class RunLogger(TensorBoardLogger):
    """TensorBoardLogger with `save_dir` None meaning the trainer's default_root_dir when run by the
    CLI, and the working directory otherwise. Other arguments as Lightning's."""

    def __init__(self, save_dir: str | None = None, name: str | None = "lightning_logs", **kwargs: Any) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, **kwargs)
