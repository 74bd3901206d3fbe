"""The machine a benchmark ran on: CPU, cores, memory, library versions, threads and allocator
settings in effect, and how busy other processes keep the cores (a busy machine makes every timing
meaningless: the result files and tables record it)."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from benchmarks.common import ALLOCATOR_ENV


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


def machine_at_start() -> dict[str, Any]:
    """`machine_info()`, after printing a warning when other processes keep the cores busy."""
    info = machine_info()
    warning = check_quiet()
    if warning:
        print(warning)
    return info
