"""The GPU check anyone with a GPU can rerun: the `gpu` test suite, then a CUDA throughput run, in one
report (benchmarks/results/gpu_check.md, with .json), in under 8 minutes on one H100-class GPU.

1. `python -m pytest tests -m gpu` (tests/test_gpu.py: every model in 32-true and bf16-mixed through
   the CLI, the speed options, deterministic mode, bf16 certificates equal to fp32 ones, every
   callback on CUDA, the certificate's Lanczos restart on the GPU, and two-process NCCL DDP when two
   GPUs exist), with a time limit;
2. `python -m benchmarks.precision --device cuda` with a short budget (MNIST from `--data-dir` when
   given, synthetic images otherwise): this project's WAE-MMD step in each precision against
   pythae's BaseTrainer with its amp flag (when pythae is installed).

    python -m benchmarks.gpu_check --data-dir ../shared/data

Without CUDA it stops at once with a message (every CI machine; the suite's tests are skips there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from benchmarks.common import RESULTS, ROOT, write_json, write_text


def run(command: list[str], limit: float) -> tuple[int, str, float]:
    """(exit status, the output's last 4000 characters, seconds) of a command from the repository root."""
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = 124, f"timed out after {limit:.0f} s\n{(expired.stdout or b'')[-4000:]!r}"
    return status, output[-4000:], time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="the folder that holds MNIST/raw (default: synthetic images)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--suite-seconds", type=float, default=300.0)
    parser.add_argument("--throughput-seconds", type=float, default=150.0)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_check needs CUDA: torch.cuda.is_available() is False on this machine.")
    device = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda}
    print(f"GPU check on {device['count']} x {device['name']} (torch {device['torch']}, CUDA {device['cuda']})", flush=True)

    suite = run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"], args.suite_seconds)
    print(f"suite: exit {suite[0]} in {suite[2]:.0f} s\n{suite[1][-1500:]}", flush=True)
    throughput_command = [sys.executable, "-m", "benchmarks.precision", "--device", "cuda", "--rounds", "1",
                          "--windows", "3", "--steps", "10", "--out", os.path.join(args.out, "gpu_check_precision")]
    if args.data_dir:
        throughput_command += ["--data-dir", args.data_dir]
    if importlib.util.find_spec("pythae") is None:
        throughput_command.append("--no-pythae")
    throughput = run(throughput_command, args.throughput_seconds)
    print(f"throughput: exit {throughput[0]} in {throughput[2]:.0f} s\n{throughput[1][-2500:]}", flush=True)

    report = [
        "# GPU check", "",
        f"Device: {device['count']} x {device['name']}; torch {device['torch']}, CUDA {device['cuda']}.", "",
        f"## `pytest tests -m gpu`: exit {suite[0]}, {suite[2]:.0f} s", "", "```", suite[1][-1500:].strip(), "```", "",
        f"## `benchmarks.precision --device cuda`: exit {throughput[0]}, {throughput[2]:.0f} s", "",
        "```", throughput[1][-2500:].strip(), "```",
    ]
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "gpu_check.md"), "\n".join(report) + "\n")
    write_json(os.path.join(args.out, "gpu_check.json"), {
        "device": device, "suite": {"exit": suite[0], "seconds": suite[2], "tail": suite[1]},
        "throughput": {"exit": throughput[0], "seconds": throughput[2], "tail": throughput[1]},
    })
    print(json.dumps({"suite_exit": suite[0], "throughput_exit": throughput[0]}))
    sys.exit(max(suite[0], throughput[0]) and 1)


if __name__ == "__main__":
    main()
