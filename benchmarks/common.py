"""What the benchmark scripts share: the process settings they time under, a description of the
machine, medians of timed windows, child processes with peak-memory measurement, result files
(CSV + JSON), Markdown tables, and pythae wrappers around the project's networks.

Process settings, the same for every contender of every script:
- glibc's allocator: MALLOC_MMAP_THRESHOLD_=33554432 and MALLOC_TRIM_THRESHOLD_=2147483648.
  glibc reads them once at start-up, so `use_allocator_env()` re-executes the script with them
  when they are missing (set BENCH_KEEP_ENV=1 to keep the environment as it is; the result files
  record what was in effect). Without them, large temporaries are mapped and unmapped on every
  call and page faults dominate some timings (MEASUREMENTS.md: 0.27 s vs 0.08 s for one solve).
- torch threads: 2 (`torch.set_num_threads`), the machine the project targets.
- denormal floats flushed to zero (`torch.set_flush_denormal(True)`): the project's models set
  it in `setup`, process-wide; setting it first gives every contender the same arithmetic.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repository
    sys.path.insert(1, ROOT)

ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",  # 32 MiB: smaller blocks come from the heap, not mmap
    "MALLOC_TRIM_THRESHOLD_": "2147483648",  # 2 GiB: freed memory is kept, not returned per call
}
THREADS = 2
KEEP_ENV_VARIABLE = "BENCH_KEEP_ENV"


# ---- process settings --------------------------------------------------------------------------


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
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


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


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions, threads and allocator settings in effect, and the
    load average and the cores other processes keep busy when called (a busy machine makes every
    timing meaningless: check it)."""
    import torch

    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_usable = os.cpu_count()
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = float("nan")
    return {
        "cpu": _cpu_model(),
        "cpu_flags": " ".join(_cpu_flags()),
        "cores_visible": os.cpu_count(),
        "cores_usable": cores_usable,
        "memory_gib": round(memory_gib, 1),
        "load_average_1m_5m_15m": [round(v, 2) for v in os.getloadavg()],
        "busy_cores_at_start": busy_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": _version("lightning"),
        "torchmetrics": _version("torchmetrics"),
        "geomloss": _version("geomloss"),
        "POT": _version("POT"),
        "pythae": _version("pythae"),
        "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One paragraph for a table caption."""
    alloc = " ".join(f"{k}={v}" for k, v in info.get("allocator_env", {}).items())
    load = info.get("load_average_1m_5m_15m")
    return (
        f"{info.get('cpu')} ({info.get('cores_usable')} usable cores, {info.get('memory_gib')} GiB), "
        f"Python {info.get('python')}, torch {info.get('torch')} on {info.get('torch_threads')} threads, "
        f"lightning {info.get('lightning')}, POT {info.get('POT')}, pythae {info.get('pythae')}; "
        f"allocator: {alloc or 'glibc defaults'}; load average at start {load}, "
        f"cores busy with other processes {info.get('busy_cores_at_start', 'not measured')}; {info.get('date')}"
    )


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores other processes keep busy now, measured over `seconds` of sleep (this
    process sleeps, so everything counted is someone else's). Unlike the load average, it does not
    remember a benchmark that finished a minute ago. Falls back to the 1-minute load average."""
    before = _cpu_times()
    if before is None:
        return os.getloadavg()[0]
    time.sleep(seconds)
    after = _cpu_times()
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total * (os.cpu_count() or 1), 2) if total > 0 else 0.0


def check_quiet(threshold: float = 0.5) -> str | None:
    """A warning line when other processes keep more than `threshold` cores busy."""
    busy = busy_cores()
    if busy > threshold:
        return (f"WARNING: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: "
                "the timings below are not representative.")
    return None


# ---- timing --------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def window_rates(marks: Sequence[float], steps_per_window: int, items_per_step: int, skip: int) -> list[float]:
    """Items per second of consecutive windows of `steps_per_window` steps, from `marks` (the
    perf_counter time at the end of every step), ignoring the first `skip` steps (warm-up).
    Window k spans the ends of steps skip + k * s and skip + (k + 1) * s (1-based counts)."""
    rates = []
    start = skip - 1  # index of the mark that opens the first window (end of the last warm-up step)
    if start < 0:
        raise ValueError("need at least one warm-up step, whose end opens the first window")
    while start + steps_per_window < len(marks):
        seconds = marks[start + steps_per_window] - marks[start]
        rates.append(steps_per_window * items_per_step / seconds)
        start += steps_per_window
    return rates


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(size: int = 4096, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured matmul rate (GFLOP/s, median of `repeats`) of two size x size matrices, on the
    current torch threads: 2 size^3 FLOPs per product."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    out = torch.empty(size, size, dtype=a.dtype)
    times = time_repeats(lambda: torch.matmul(a, b, out=out), repeats, warmup=1)
    return 2 * size**3 / median(times) / 1e9


# ---- child processes and their peak memory ----------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_entry(connection: Any, fn: Callable[..., dict], args: tuple, threads: int,
                 prepare: Callable[..., Any] | None, prepare_args: tuple) -> None:
    try:
        set_torch_threads(threads)
        if prepare is not None:
            prepare(*prepare_args)  # imports and first-call set-up: not counted as the solve's memory
        baseline = rss_bytes()
        result = dict(fn(*args))
        result["rss_baseline_mib"] = baseline / 2**20
        result["rss_peak_mib"] = peak_rss_bytes() / 2**20
        result["rss_peak_extra_mib"] = (peak_rss_bytes() - baseline) / 2**20
        connection.send(("ok", result))
    except BaseException as err:  # report, never hang the parent
        connection.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        connection.close()


def run_in_child(fn: Callable[..., dict], args: tuple = (), timeout: float | None = None, threads: int = THREADS,
                 prepare: Callable[..., Any] | None = None, prepare_args: tuple = ()) -> tuple[str, Any]:
    """Run fn(*args) -> dict in a fresh (spawned) process, so that its peak memory is its own.

    `prepare(*prepare_args)` runs first in the child (imports, a tiny warm-up call), then the
    child's RSS is taken as the baseline. Returns ("ok", result) with `rss_baseline_mib`,
    `rss_peak_mib` (ru_maxrss: the peak over the child's life, prepare included) and
    `rss_peak_extra_mib` (peak minus baseline: what fn itself needed, when fn's peak is above
    prepare's) added; ("timeout", None) when it ran past `timeout` seconds (the child is
    terminated); ("error", message). `fn` and `prepare` must be importable by name (module-level
    functions of the script or of this module).
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_entry, args=(sender, fn, args, threads, prepare, prepare_args), daemon=True)
    child.start()
    sender.close()
    status: tuple[str, Any]
    if receiver.poll(timeout):
        try:
            status = receiver.recv()
        except EOFError:
            status = ("error", f"the child process died (exit code {child.exitcode}; out of memory?)")
    else:
        status = ("timeout", None)
        child.terminate()
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    return status


# ---- result files and tables ----------------------------------------------------------------------


def result_stem(name: str, quick: bool, out: str = RESULTS) -> str:
    """benchmarks/results/<name>[_quick]: the path without its extension."""
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


def write_report(stem: str, text: str, rows: Sequence[dict[str, Any]], payload: dict[str, Any]) -> None:
    """Print the report and write it to <stem>.md, its rows to <stem>.csv and `payload` to <stem>.json."""
    print(text)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".md", "w") as handle:
        handle.write(text + "\n")
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


# ---- pythae wrappers around the project's networks ------------------------------------------------


def import_pythae() -> Any:
    """The pythae package, or a ModuleNotFoundError that says how to install it."""
    try:
        import pythae  # noqa: F401
        from pythae.models import WAE_MMD, WAE_MMD_Config  # noqa: F401
        from pythae.trainers import BaseTrainer  # noqa: F401
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "This benchmark compares with pythae (the peer WAE library), an optional dependency: "
            'pip install -e ".[bench]" (or pip install pythae). Skip the pythae rows with --no-pythae.'
        ) from err
    import logging

    # pythae's modules attach their own INFO console handlers at import; keep its warnings only.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return pythae


def pythae_wae_mmd(encoder: Any, decoder: Any, data_shape: Sequence[int], latent_dim: int, lambda_: float) -> Any:
    """pythae's WAE_MMD around the project's encoder and decoder modules, with the settings that
    match `lightning_modules.wae.WAE(latent_penalty="mmd", kernel="imq", cost="l2sq",
    prior="gaussian")`: kernel "imq", bandwidth 1 (so C = 2 d_z, the project's base scale for a
    unit-variance prior), the WAE paper's scales (0.1 ... 10, the project's DEFAULT_KERNEL_SCALES),
    reg_weight = lambda_, reconstruction loss scale 1 (pythae's loss is the squared error summed
    over pixels, averaged over the batch: the project's l2sq cost)."""
    import_pythae()
    from pythae.models import WAE_MMD, WAE_MMD_Config
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    from lightning_modules.losses import DEFAULT_KERNEL_SCALES

    class Encoder(BaseEncoder):
        def __init__(self, net: Any) -> None:
            BaseEncoder.__init__(self)
            self.net = net

        def forward(self, x: Any) -> Any:
            return ModelOutput(embedding=self.net(x))  # (B, d_z)

    class Decoder(BaseDecoder):
        def __init__(self, net: Any) -> None:
            BaseDecoder.__init__(self)
            self.net = net

        def forward(self, z: Any) -> Any:
            return ModelOutput(reconstruction=self.net(z))  # (B, C, H, W)

    config = WAE_MMD_Config(
        input_dim=tuple(data_shape), latent_dim=latent_dim, kernel_choice="imq", reg_weight=lambda_,
        kernel_bandwidth=1.0, scales=list(DEFAULT_KERNEL_SCALES), reconstruction_loss_scale=1.0,
    )
    return WAE_MMD(config, encoder=Encoder(encoder), decoder=Decoder(decoder))


PYTHAE_MATCHING = [
    ("reconstruction cost", "sum over pixels of (x - G(E(x)))^2, batch mean (cost='l2sq')",
     "F.mse_loss(reduction='none').sum(-1), batch mean, reconstruction_loss_scale=1", "equal"),
    ("latent penalty", "unbiased MMD^2 U-statistic, cross term / (n m)", "the same estimator", "equal"),
    ("kernel", "IMQ summed over scales (0.1, 0.2, 0.5, 1, 2, 5, 10) x C, C = 2 d_z",
     "kernel_choice='imq', scales as ours, kernel_bandwidth=1 -> C = 2 d_z", "equal"),
    ("kernel arithmetic", "squared distances by the Gram expansion |x|^2 + |y|^2 - 2 x.y (one matmul)",
     "torch.norm of the (B, B, d_z) difference tensor, squared", "differs (same value to rounding)"),
    ("lambda", "lambda_=10", "reg_weight=10", "equal"),
    ("prior", "N(0, I) codes drawn per step", "torch.randn_like(z) per step", "equal"),
    ("networks", "the project's encoder / decoder builders", "the same modules wrapped in BaseEncoder / BaseDecoder",
     "equal"),
    ("optimiser", "Adam(lr=1e-3, betas=(0.5, 0.999)) on encoder + decoder", "the same", "equal"),
    ("batch input", "a tensor from the DataLoader", "a DatasetOutput dict (data=...) as pythae's forward needs",
     "differs (a dict per step)"),
]


def draw_ring_panel(ax: Any, point_sets: Sequence[tuple[Sequence[Sequence[float]], str | None]],
                    centers: Sequence[Sequence[float]], title: str) -> None:
    """One square panel of 2-D points on [-3, 3]^2 (the ring of 8 Gaussians has radius 2): each
    (points, label) set as a scatter (non-finite points dropped), the mixture centres as red
    crosses, and the title."""
    for points, label in point_sets:
        finite = [p for p in points if all(map(math.isfinite, p))]
        if finite:
            ax.scatter(*zip(*finite), s=2, alpha=0.4, label=label)
    ax.scatter(*zip(*centers), s=14, c="red", marker="x")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
