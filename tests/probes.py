"""Test-only helpers for runs of `python train.py` in subprocesses (tests/test_ddp.py, test_resume.py).

Callbacks, added on the command line with `--trainer.callbacks+=probes.MetricsProbe` (the tests put
this folder on PYTHONPATH):
- `MetricsProbe(out_dir)`: each rank writes `<out_dir>/rank<R>.json` at the end of `fit`: the
  scalar `trainer.callback_metrics` after every validation epoch, the next random numbers of the
  module's stream at its first training batch (ranks must differ), a hash of the local generated
  samples of any callback whose torchmetrics state holds them (`metric.fake`), hashes of the
  parameters and buffers at the end, and the global step at which training started.
- `KillAtStep(step)`: SIGKILL this process (no clean-up, as a crash or a cluster's pre-emption)
  after the training batch that brings `trainer.global_step` to `step`.
- `KillDuringCheckpointWrite(write)`: SIGKILL this process halfway through writing `last.ckpt`
  for the `write`-th time (half of the bytes on disk, then the kill).

`run_train(args, cwd)` runs `python train.py ARGS` with this folder importable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def run_train(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py *args` in `cwd` (one thread per process, this folder on PYTHONPATH)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PRIMAL_DUAL_TRACEBACK", None)
    command = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tensor_hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class MetricsProbe(L.Callback):
    """Write what this rank logged and drew to `<out_dir>/rank<R>.json` (see the module docstring)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record: dict[str, Any] = {"epochs": [], "sample_hashes": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.update(global_rank=trainer.global_rank, world_size=trainer.world_size, start_step=trainer.global_step)
        self.record["optimizer_sizes"] = [sum(p.numel() for g in o.param_groups for p in g["params"]) for o in trainer.optimizers]
        self.record["reducer_buckets"] = 0
        ddp = trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):  # counts DDP's own bucket reductions
            def count_buckets(state, bucket):  # no annotations: DDP checks them against the real classes
                self.record["reducer_buckets"] += 1
                return torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, count_buckets)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if "noise" not in self.record:  # what the module's next latent draws come from, without consuming it
            with torch.random.fork_rng():
                self.record["noise"] = torch.randn(8).tolist()
        if batch_idx == 1 and "all_reduce_sizes" not in self.record:  # the all-reduces of one training batch
            sizes, real = [], torch.distributed.all_reduce
            self.record["all_reduce_sizes"], self._real_all_reduce = sizes, real

            def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                sizes.append(tensor.numel())
                return real(tensor, *args, **kwargs)

            torch.distributed.all_reduce = recording

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_real_all_reduce", None) is not None:
            torch.distributed.all_reduce, self._real_all_reduce = self._real_all_reduce, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.record["epochs"].append({"epoch": trainer.current_epoch, "metrics": metrics})
        for callback in trainer.callbacks:
            fake = getattr(getattr(callback, "metric", None), "fake", None)
            if isinstance(fake, list) and fake:
                self.record["sample_hashes"].append(f"{type(callback).__name__}:{tensor_hash(fake)}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["final_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.record["global_step"] = trainer.global_step
        self.record["parameters"] = tensor_hash(list(pl_module.parameters()))
        self.record["buffers"] = tensor_hash(list(pl_module.buffers()))
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.record, f, indent=1)


class KillAtStep(L.Callback):
    """SIGKILL the process after the training batch that reaches global step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringCheckpointWrite(L.Callback):
    """SIGKILL the process halfway through the `write`-th write of a file named like `last.ckpt`.

    Wraps `torch.save`: when it writes into a file whose name contains "last.ckpt" for the
    `write`-th time, it serialises the checkpoint, writes half of the bytes, syncs them to disk
    and kills the process.
    """

    def __init__(self, write: int = 2) -> None:
        self.write = write

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        real_save, seen = torch.save, []

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            name = str(getattr(f, "name", f))
            if "last.ckpt" in name:
                seen.append(name)
                if len(seen) == self.write:
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    if hasattr(f, "write"):
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    else:
                        with open(f, "wb") as out:
                            out.write(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f, *args, **kwargs)

        torch.save = save
