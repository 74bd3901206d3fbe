"""Run every benchmark of docs/BENCHMARKS.md and regenerate that page from the result files.

    python -m benchmarks.run_all --quick        # every table at small budgets (target: under 15 minutes on 2 cores)
    python -m benchmarks.run_all                # the full settings
    python -m benchmarks.run_all --docs-only    # only rewrite docs/BENCHMARKS.md from benchmarks/results/

Each benchmark runs in its own process (`python -m benchmarks.NAME`, which re-executes itself with
the glibc allocator settings of benchmarks/common.py) and writes
benchmarks/results/<name>[_quick].{csv,json} (+ .png). The wall time of each is recorded in
benchmarks/results/run_all[_quick].json. The page shows, per benchmark, the full-settings results
when they exist, else the quick ones, with the machine they ran on and the exact command; do not
edit its tables by hand. Figures recorded by hand (training times of the configs, the figures
behind the benchmarks' settings), benchmarks/results/hand_recorded.md, close the page.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks import common
from benchmarks.machine import check_quiet, describe_machine, machine_info

SCRIPTS = ("throughput", "transport", "fid_cost", "quality", "quality_mnist", "precision", "link_bracket")
DOCS = os.path.join(common.ROOT, "docs", "BENCHMARKS.md")
HAND_RECORDED = "hand_recorded.md"  # the page's last section, written by hand, in the results folder
TITLES = {
    "throughput": "1. Training throughput: WAE-MMD at 28x28 against a plain loop, pythae and the CPU's roof",
    "transport": "2. Certified Wasserstein bracket against POT: time, memory, tightness",
    "fid_cost": "3. What the FID and Sinkhorn callbacks cost per validation",
    "quality": "4. Sample quality on the digits: domain FID and Sinkhorn bound after an equal budget",
    "quality_mnist": "5. Sample quality on real MNIST: every model beside pythae at an equal budget",
    "precision": "6. The WAE-MMD step on MNIST in each precision and speed option, against pythae",
    "link_bracket": "7. The exact dual's certified bracket on 1000 points",
}


def run_scripts(names: list[str], quick: bool, out: str) -> dict[str, Any]:
    """Run the scripts one after the other; returns {name: {seconds, returncode, command}}."""
    record: dict[str, Any] = {}
    for name in names:
        argv = [sys.executable, "-m", f"benchmarks.{name}"]
        if os.path.abspath(out) != os.path.abspath(common.RESULTS):
            argv += ["--out", out]
        if quick:
            argv.append("--quick")
        command = " ".join(["python", "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])])
        print(f"\n=== {command}", flush=True)
        start = time.time()
        code = subprocess.call(argv, cwd=common.ROOT)
        seconds = time.time() - start
        record[name] = {"seconds": round(seconds, 1), "returncode": code, "command": command}
        print(f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)
    return record


def _load(name: str, out: str) -> dict[str, Any] | None:
    """The full-settings result of a benchmark if present, else the quick one, else None."""
    for quick in (False, True):
        payload = common.read_json(os.path.join(out, name + ("_quick" if quick else "") + ".json"))
        if payload is not None:
            return payload
    return None


def current_command(command: str) -> str:
    """A recorded command in today's form: result files written before the benchmarks became a
    package record `python benchmarks/NAME.py ...`, run today as `python -m benchmarks.NAME ...`."""
    return re.sub(r"^python (benchmarks|studies)/(\w+)\.py\b", r"python -m \1.\2", command)


def what_it_measures(docstring: str) -> str:
    """A script's docstring without its title line and from its usage block on."""
    paragraphs = docstring.strip().split("\n\n")[1:]
    kept = []
    for paragraph in paragraphs:
        if paragraph.startswith("    python -m"):
            break
        kept.append(paragraph)
    return "\n\n".join(kept)


def _section(name: str, payload: dict[str, Any] | None, out: str) -> list[str]:
    module = importlib.import_module(f"benchmarks.{name}")
    lines = [f"## {TITLES[name]}", "", what_it_measures(module.__doc__ or ""), ""]
    if name == "throughput":
        lines += ["How pythae's WAE_MMD is matched to this project's WAE:", "", module.matching_table(), ""]
    if payload is None:
        return lines + [f"No results yet: run `python -m benchmarks.{name}` (or `--quick`).", ""]
    command = current_command(payload["command"])
    words = command.split()[3:]  # after "python -m benchmarks.NAME"
    flags = [w for i, w in enumerate(words) if w != "--quick" and w != "--out" and (i == 0 or words[i - 1] != "--out")]
    settings = "custom budgets" if flags else ("quick budgets" if payload.get("quick") else "full budgets")
    lines += [f"Command: `{command}` ({settings}, {payload['wall_seconds']:.0f} s).", "",
              f"Machine: {describe_machine(payload['machine'])}.", ""]
    busy = payload["machine"].get("busy_cores_at_start")
    if busy is None:  # results written before busy_cores existed: the load average is all there is
        busy = (payload["machine"].get("load_average_1m_5m_15m") or [0])[0]
        busy = busy if busy > 1.5 else 0.0
    if busy > 0.5:
        lines += [f"**Warning: other processes kept {busy:.1f} cores busy when this ran; rerun on a quiet "
                  "machine before quoting these times.**", ""]
    lines += [module.table(payload), ""]
    png = os.path.join(out, name + ("_quick" if payload.get("quick") else "") + ".png")
    if os.path.exists(png):
        rel = os.path.relpath(png, os.path.dirname(DOCS))
        lines += [f"![{name}]({rel})", ""]
    return lines


def render_docs(out: str) -> str:
    """docs/BENCHMARKS.md from the result files in `out`."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.run_all` from the files in `benchmarks/results/`: rerun it to "
        "refresh this page, do not edit the tables by hand. Each section names the machine and the exact command "
        "of its numbers. The test suite makes no timing assertions; timings live here. The research studies "
        "(the primal-dual chain, the lambda limits, mode coverage, ...) are in [STUDIES.md](STUDIES.md).",
        "",
        "Reproduce:",
        "",
        "```bash",
        'pip install -e ".[bench]"                    # pythae, POT, scipy beside the project',
        "python -m benchmarks.run_all --quick         # every table at small budgets (from the repository root)",
        "python -m benchmarks.run_all                 # the full settings",
        "python -m benchmarks.run_all --docs-only     # rewrite this page from the result files",
        "```",
        "",
        "Every script sets the same process settings for all its contenders (`benchmarks/common.py`): 2 torch "
        "threads, denormals flushed to zero, and glibc's allocator settings "
        + ", ".join(f"`{k}={v}`" for k, v in common.ALLOCATOR_ENV.items())
        + " (each script re-executes itself with them; `BENCH_KEEP_ENV=1` keeps the environment as it is).",
        "",
    ]
    runs = []
    for quick in (True, False):
        record = common.read_json(os.path.join(out, "run_all" + ("_quick" if quick else "") + ".json"))
        if record:
            total = sum(r["seconds"] for r in record["scripts"].values())
            parts = ", ".join(f"{n} {r['seconds']:.0f} s" + ("" if r["returncode"] == 0 else " (failed)")
                              for n, r in record["scripts"].items())
            runs.append(f"| `{current_command(record['command'])}` | {total / 60:.1f} min | {parts} | {record['machine']} |")
    lines += ["Run times of `python -m benchmarks.run_all`:", "", "| command | wall time | per script | machine |", "|---|---|---|---|"]
    lines += runs or ["| - | not run yet | | |"]
    lines.append("")
    for name in SCRIPTS:
        lines += _section(name, _load(name, out), out)
    hand_recorded = os.path.join(out, HAND_RECORDED)
    if os.path.exists(hand_recorded):
        with open(hand_recorded) as handle:
            lines += [handle.read().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script with --quick")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run these scripts only")
    parser.add_argument("--docs-only", action="store_true", help="run nothing; regenerate docs/BENCHMARKS.md")
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args()
    if not args.docs_only:
        common.use_allocator_env()  # the scripts inherit it (each would re-execute itself otherwise)
    os.makedirs(args.out, exist_ok=True)
    if not args.docs_only:
        names = args.only or list(SCRIPTS)
        warning = check_quiet()
        if warning:
            print(warning)
        scripts = run_scripts(names, args.quick, args.out)
        path = os.path.join(args.out, "run_all" + ("_quick" if args.quick else "") + ".json")
        previous = (common.read_json(path) or {}).get("scripts", {}) if args.only else {}
        import torch  # noqa: F401  (machine_info reads torch's version)

        info = machine_info()
        common.write_json(path, {"command": common.command_line(), "machine": describe_machine(info),
                                 "scripts": {**previous, **scripts}})
        failed = [n for n, r in scripts.items() if r["returncode"] != 0]
        total = sum(r["seconds"] for r in scripts.values())
        print(f"\nall scripts: {total / 60:.1f} min" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    os.makedirs(os.path.dirname(DOCS), exist_ok=True)
    with open(DOCS, "w") as handle:
        handle.write(render_docs(args.out))
    print(f"wrote {os.path.relpath(DOCS, common.ROOT)}")


if __name__ == "__main__":
    main()
