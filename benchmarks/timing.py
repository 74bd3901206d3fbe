"""Timing and memory: rates of timed windows, repeated calls, the machine's matmul rate, and
child processes whose peak resident memory is their own."""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable, Sequence

from benchmarks.common import THREADS, median, set_torch_threads


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
