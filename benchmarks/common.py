"""What the benchmarks (and the studies) share: the process settings they time under, the configs
they read, a bare Lightning Trainer, worker processes, result files (CSV + JSON + Markdown),
Markdown tables and figures. The machine description is in `benchmarks.machine`, timing and child
processes with their peak memory in `benchmarks.timing`, the pythae peer in `benchmarks.pythae_peer`.

Process settings, the same for every contender of every benchmark:
- glibc's allocator: MALLOC_MMAP_THRESHOLD_=33554432 and MALLOC_TRIM_THRESHOLD_=2147483648.
  glibc reads them once at start-up, so `use_allocator_env()` re-executes the script with them
  when they are missing (set BENCH_KEEP_ENV=1 to keep the environment as it is; the result files
  record what was in effect). Without them, large temporaries are mapped and unmapped on every
  call and page faults dominate some timings (docs/BENCHMARKS.md section 8).
- torch threads: 2 (`torch.set_num_threads`), the machine the project targets.
- denormal floats flushed to zero (`torch.set_flush_denormal(True)`): the project's models set
  it in `setup`, process-wide; setting it first gives every contender the same arithmetic.

Scripts run from the repository root as modules (`python -m benchmarks.NAME`, `python -m studies.NAME`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import statistics
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# The digits domain feature extractor (FIDCallback's "domain" features), trained once and cached here.
DIGITS_FEATURE_PATH = os.path.join(ROOT, "runs", "benchmarks", "fid_features_digits_1x8x8.pt")

ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",  # 32 MiB: smaller blocks come from the heap, not mmap
    "MALLOC_TRIM_THRESHOLD_": "2147483648",  # 2 GiB: freed memory is kept, not returned per call
}
THREADS = 2
KEEP_ENV_VARIABLE = "BENCH_KEEP_ENV"


# ---- process settings --------------------------------------------------------------------------


def _main_arguments() -> list[str]:
    """The arguments that start this process's main script again: `-m package.module ...` when it
    runs as a module (the benchmarks do), else the script path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    return list(sys.argv)


def use_allocator_env() -> None:
    """Re-execute this script under ALLOCATOR_ENV unless it already runs with it (or
    BENCH_KEEP_ENV=1). Call first thing in `main()`, before any heavy import."""
    if os.environ.get(KEEP_ENV_VARIABLE) == "1":
        return
    if all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    env = {**os.environ, **ALLOCATOR_ENV}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *_main_arguments()], env)


def set_torch_threads(threads: int = THREADS) -> None:
    """torch's intra-op threads and denormal flushing, as every contender runs them."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def quiet_lightning() -> None:
    """Lightning's banners and tips off (its import sets its loggers' levels, so import it first),
    and the "few DataLoader workers" warning: the benchmarks' data sit in memory."""
    import logging
    import warnings

    import lightning  # noqa: F401

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")  # validation is off on purpose
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a deprecation inside lightning, not ours
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_worker(threads: int = 1) -> None:
    """A worker process that trains many small runs: `threads` torch threads (tiny networks run
    best on one core each), no banners and no warnings (they would repeat once per run)."""
    import warnings

    set_torch_threads(threads)
    quiet_lightning()
    warnings.filterwarnings("ignore")


def parse_benchmark_arguments(parser: Any, threads: int = THREADS) -> Any:
    """Add `--out` (default benchmarks/results) to a benchmark's parser, parse the command line,
    then apply the process settings: the allocator re-execution (after parsing, so that `--help`
    does not re-execute) and `threads` torch threads."""
    parser.add_argument("--out", default=RESULTS, help="folder of the result files")
    args = parser.parse_args()
    use_allocator_env()
    set_torch_threads(threads)
    return args


def command_line() -> str:
    """The command that ran this script, from the repository root."""
    arguments = _main_arguments()
    if arguments[0] != "-m":
        arguments[0] = os.path.relpath(os.path.abspath(arguments[0]), ROOT)
    return " ".join(["python", *map(shlex.quote, arguments)])


# ---- configs, training, workers ------------------------------------------------------------------


def config_path(name: str) -> str:
    """configs/<name>.yaml (a path ending in .yaml is returned as it is)."""
    return name if name.endswith(".yaml") else os.path.join(ROOT, "configs", f"{name}.yaml")


def read_config(name: str) -> dict[str, Any]:
    """A train.py config as a dict ({} when the file is missing)."""
    import yaml

    path = config_path(name)
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return yaml.safe_load(handle)


def config_parts(name: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(model init_args, data init_args, trainer max_epochs) of a train.py config."""
    config = read_config(name)
    epochs = config.get("trainer", {}).get("max_epochs")
    return (dict(config["model"].get("init_args") or {}), dict(config["data"].get("init_args") or {}),
            None if epochs is None else int(epochs))


def bare_trainer(**options: Any) -> Any:
    """A one-process CPU `lightning.Trainer` with no logger, checkpoints, progress bar, model
    summary or sanity check: what every benchmark and study trains with. `options` add to or
    override these (max_epochs, callbacks, limit_val_batches, ...)."""
    import lightning as L

    settings: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**settings, **options})


def map_in_workers(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """fn(job) for every job in `workers` spawned processes, yielded in the jobs' order as they
    finish. `fn` must be importable by name (a module-level function)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(fn, jobs)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the finite values (sd 0 for one value); (None, None) for none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.mean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


# ---- result files and tables ----------------------------------------------------------------------


def result_stem(name: str, quick: bool, out: str = RESULTS) -> str:
    """<out>/<name>[_quick]: the path without its extension (out defaults to benchmarks/results)."""
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, name + ("_quick" if quick else ""))


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """One row per dict; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "" if value is None else value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, default=_json_default, allow_nan=True)
        handle.write("\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text.rstrip("\n") + "\n")


def write_report(stem: str, text: str, rows: Sequence[dict[str, Any]], payload: dict[str, Any]) -> None:
    """Print the report and write it to <stem>.md, its rows to <stem>.csv and `payload` to <stem>.json."""
    print(text)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    write_text(stem + ".md", text)
    write_csv(stem + ".csv", rows)
    write_json(stem + ".json", payload)


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def result_payload(name: str, quick: bool, settings: dict[str, Any], rows: list[dict], summary: dict[str, Any],
                   machine: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The JSON every script writes: what ran, where, with which settings, and the numbers."""
    return {
        "benchmark": name,
        "quick": quick,
        "command": command_line(),
        "settings": settings,
        "machine": machine,
        "wall_seconds": round(seconds, 1),
        "rows": rows,
        "summary": summary,
    }


def publish(payload: dict[str, Any], table: str, out: str, csv_files: dict[str, Sequence[dict[str, Any]]] | None = None) -> str:
    """Print a benchmark's table with its run time and machine, write <stem>.csv (the payload's rows,
    or `csv_files` {suffix: rows}) and <stem>.json; returns the stem, for the script's own files."""
    from benchmarks.machine import describe_machine

    print()
    print(table)
    print(f"\n({payload['wall_seconds']:.0f} s; {describe_machine(payload['machine'])})")
    stem = result_stem(payload["benchmark"], payload["quick"], out)
    for suffix, rows in (csv_files or {"": payload["rows"]}).items():
        write_csv(stem + suffix + ".csv", rows)
    write_json(stem + ".json", payload)
    print(f"wrote {stem}.json and its CSV files")
    return stem


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: numbers formatted with `spec`, None / NaN as a dash, strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "-"
        return format(value, spec)
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are converted with `str`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


# ---- figures ---------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str, dpi: int = 80, tight: bool = True) -> None:
    """Lay the figure out, write it to `path` and free it."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def sample_grids(panels: Sequence[tuple[str, Any]], path: str, title: str, cols: int, size: float = 2.6,
                 dpi: int = 100) -> None:
    """One panel of 8-wide image grids per (caption, images (N, 1, H, W) in [-1, 1], nested lists or a
    tensor), written to `path`. Non-finite pixels are drawn black."""
    import torch
    from torchvision.utils import make_grid

    plt = pyplot()
    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.4) * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (caption, images) in zip(axes.flat, panels):
        images = torch.as_tensor(images).nan_to_num(0.0).clamp(-1, 1)  # (N, 1, H, W)
        grid = make_grid((images + 1) / 2, nrow=8, padding=1, pad_value=1.0)[0]  # (H', W')
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()), h_pad=1.2)
    save_figure(fig, path, dpi=dpi, tight=False)
