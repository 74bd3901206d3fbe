"""Time, peak memory and tightness of the certified Wasserstein bracket against POT (docs/theory.md 5).

For Gaussian clouds x ~ N(0, I_d) and y ~ N(mu, I_d), |mu| = 1 (mu = (1, ..., 1) / sqrt(d)), n
points each, uniform weights, squared Euclidean cost C_ij = |x_i - y_j|^2, every configuration
n in {256, 1024, 4096, 16384} x d in {2, 64, 784} runs these solvers, each in a fresh process
(spawned) so that its peak resident memory is its own:

- `bracket`: `transport.wasserstein_bracket(x, y, tol=0.01)` (defaults otherwise: the certified
  Sinkhorn bracket with `exact=False`, adaptive eps, float32 iterations and float64
  certificates, backend "auto" = the float64 cost matrix and the float32 kernel held while they
  fit in half the available memory, the multiscale start at d = 2), then
  `sinkhorn_upper_bound(x, y)` (its defaults, the same time budget) in the same process, its
  time reported apart;
- `auto`: `wasserstein_bracket(x, y, tol=0.01, exact="auto")`, which answers with POT's exact
  value where its cost model (`transport.exact`) predicts POT to be faster, and with the bracket
  otherwise (then not run again: the bracket's time is reported);
- `emd2`: POT's exact network simplex `ot.emd2` on `ot.dist(x, y)` (float64 numpy; the time
  includes building the cost matrix), the reference value W;
- `pot_sinkhorn`: POT's `ot.sinkhorn2(method="sinkhorn_log")` at the eps the bracket ended at
  (POT's reg multiplies sum pi log pi, which differs from the bracket's eps KL(pi || a x b) by a
  constant on the transport polytope: the same problem), float64 torch tensors in (POT's torch
  backend), POT's defaults otherwise (stopping threshold 1e-9 on its column-marginal error, at
  most 1000 iterations: `--pot-max-iter`). Its plan is not rounded onto the marginals, so its
  value is not a certified bound.

Peak memory: the child's peak RSS (`ru_maxrss`) minus its RSS after the imports and a tiny
warm-up solve (n = 32), i.e. what the measured solve itself added. Tightness: upper / W - 1, lower / W - 1 and POT's value / W - 1.
Configurations whose exact solve would exceed `--max-exact-n` (or the machine's memory, or
`--exact-timeout` seconds) are skipped and marked in the table.

`sinkhorn_upper_bound` runs the same solver as the bracket (its value is the bracket's upper end),
so above `--upper-max-n` it is not run again.

Scale-up: the bracket alone on the chunked backend (memory O(n d): float32 log-domain passes over
blocks of C recomputed each pass, float64 certificates on recomputed blocks), d = `--scale-dim`,
n doubling from `--scale-min-n` (16384) up to `--scale-max-n` (32768) while its peak stays under
4 GiB (holding the kernel and the float64 matrix would need 12 n^2 bytes: 3 GiB at n = 16384),
each n with the time budget `--scale-seconds`: the time when it converges within it, else the
width it reached. `--scale-device cuda` runs the scale-up on a GPU with backend "auto" (the
kernel held when it fits in three quarters of the free GPU memory), e.g. n = 100000:
`--sizes 256 --dims 2 --scale-device cuda --scale-min-n 100000 --scale-max-n 100000 --out DIR`.

Process settings as in benchmarks/common.py (2 threads, glibc allocator settings re-exec).

    python -m benchmarks.transport --quick     # n <= 4096 (POT sinkhorn n <= 1024), 20 s budgets, scale-up 8192
    python -m benchmarks.transport             # the full grid, exact up to 16384, scale-up to 32768

Writes benchmarks/results/transport[_quick].csv / .json and transport[_quick].png (time and
memory against n).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from benchmarks import common
from benchmarks.machine import machine_at_start
from benchmarks.timing import run_in_child
from benchmarks.transport_report import plot, table, verdicts

NAME = "transport"
TOL = 0.01
COST = "l2sq"
MEMORY_LIMIT_GIB = 4.0


def gaussian_clouds(n: int, d: int, seed: int = 0) -> tuple[Any, Any]:
    """x ~ N(0, I_d), y ~ N(mu, I_d) with mu = (1, ..., 1) / sqrt(d); float64 (n, d) each."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + n * 1009 + d)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, d, generator=generator, dtype=torch.float64) + 1.0 / math.sqrt(d)
    return x, y


# ---- the solvers, each run in a child process ----------------------------------------------------


def prepare_bracket(d: int) -> None:
    """Imports and a tiny solve, so that lazy set-up is not counted as the measured solve's."""
    from transport import wasserstein_bracket

    wasserstein_bracket(*gaussian_clouds(32, d, seed=1), cost=COST, tol=TOL, max_seconds=10.0, backend="tensorized")


def prepare_auto(d: int) -> None:
    """`prepare_bracket`, and POT's exact solve through `exact="auto"`."""
    from transport import wasserstein_bracket

    prepare_bracket(d)
    wasserstein_bracket(*gaussian_clouds(32, d, seed=1), cost=COST, tol=TOL, exact=True)


def auto_prefers_pot(n: int, d: int) -> bool:
    """What `exact="auto"` will choose on this machine (its cost model and memory budget)."""
    import torch

    from transport.exact import prefer_exact
    from transport.matrix import memory_budget

    return prefer_exact(n, n, d, torch.device("cpu"), memory_budget(torch.device("cpu")))


def prepare_pot(d: int) -> None:
    import numpy as np
    import ot
    import torch

    x, y = gaussian_clouds(32, d, seed=1)
    a = np.full(32, 1.0 / 32)
    ot.emd2(a, a, ot.dist(x.numpy(), y.numpy()))
    ot.sinkhorn2(torch.from_numpy(a), torch.from_numpy(a), ot.dist(x, y), 1.0, method="sinkhorn_log", numItermax=10)


def child_bracket(n: int, d: int, backend: str, max_seconds: float | None, with_upper: bool, exact: bool | str = False,
                  device: str = "cpu") -> dict[str, Any]:
    """The bracket, then (with_upper) `sinkhorn_upper_bound` at its defaults on the same clouds."""
    import torch

    from transport import sinkhorn_upper_bound, wasserstein_bracket

    x, y = (t.to(device) for t in gaussian_clouds(n, d))
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    bracket = wasserstein_bracket(x, y, cost=COST, tol=TOL, max_seconds=max_seconds, backend=backend, exact=exact)
    seconds = time.perf_counter() - start
    out = {"lower": bracket.lower, "upper": bracket.upper, "eps": bracket.eps, "iterations": bracket.iterations,
           "converged": bracket.converged, "relative_width": bracket.relative_width, "seconds": seconds,
           "method": bracket.method}
    if device != "cpu":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if with_upper:
        start = time.perf_counter()
        out["upper_bound"] = sinkhorn_upper_bound(x, y, cost=COST, max_seconds=max_seconds, backend=backend)
        out["upper_bound_seconds"] = time.perf_counter() - start
    return out


def child_emd2(n: int, d: int) -> dict[str, Any]:
    import numpy as np
    import ot

    x, y = (t.numpy() for t in gaussian_clouds(n, d))
    start = time.perf_counter()
    M = ot.dist(x, y)  # squared Euclidean, float64 (n, n)
    matrix_seconds = time.perf_counter() - start
    a = np.full(n, 1.0 / n)
    value, log = ot.emd2(a, a, M, numItermax=max(100_000, 50 * n * n), log=True)
    seconds = time.perf_counter() - start
    if log.get("warning"):
        raise RuntimeError(f"ot.emd2 did not reach the optimum: {log['warning']}")
    return {"value": float(value), "seconds": seconds, "cost_matrix_seconds": matrix_seconds}


def child_pot_sinkhorn(n: int, d: int, eps: float, max_iter: int) -> dict[str, Any]:
    import ot
    import torch

    x, y = gaussian_clouds(n, d)
    start = time.perf_counter()
    M = ot.dist(x, y)  # torch float64: POT's torch backend
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    value, log = ot.sinkhorn2(a, a, M, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9, log=True)
    seconds = time.perf_counter() - start
    last_error = float(log["err"][-1]) if log["err"] else float("nan")
    return {"value": float(value), "seconds": seconds, "iterations": int(log["niter"]) + 1,
            "marginal_error_l2": last_error, "converged": last_error < 1e-9}


# ---- the grid -----------------------------------------------------------------------------------


def exact_skip_reason(n: int, args: argparse.Namespace, machine: dict[str, Any]) -> str | None:
    """Why the exact solve is skipped at this n, or None. ot.emd2 holds the cost matrix and a
    dense plan (2 n^2 float64) plus its network's arrays."""
    need_gib = 2 * 8 * n * n / 2**30
    if n > args.max_exact_n:
        return f"skipped: n > --max-exact-n {args.max_exact_n} (cost matrix {8 * n * n / 2**30:.1f} GiB, minutes to hours)"
    if need_gib > 0.7 * machine["memory_gib"]:
        return f"skipped: needs about {need_gib:.0f} GiB, the machine has {machine['memory_gib']} GiB"
    return None


def status_text(status: str, payload: Any, timeout: float | None) -> str:
    if status == "timeout":
        return f"timed out (> {timeout:.0f} s)"
    return f"failed: {payload}"


def run_grid(args: argparse.Namespace, machine: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for n in args.sizes:
        for d in args.dims:
            row: dict[str, Any] = {"n": n, "d": d}
            with_upper = n <= args.upper_max_n
            status, out = run_in_child(child_bracket, (n, d, "auto", args.bracket_seconds, with_upper),
                                              timeout=2 * args.bracket_seconds + 300, prepare=prepare_bracket, prepare_args=(d,))
            if status == "ok":
                row.update({f"bracket_{k}": v for k, v in out.items() if k not in ("upper_bound", "upper_bound_seconds")})
                row["upper_bound"], row["upper_bound_seconds"] = out.get("upper_bound"), out.get("upper_bound_seconds")
            else:
                row["bracket_note"] = status_text(status, out, 2 * args.bracket_seconds + 300)
            if auto_prefers_pot(n, d):  # else exact="auto" runs the bracket just measured
                status, out = run_in_child(child_bracket, (n, d, "auto", args.bracket_seconds, False, "auto"),
                                           timeout=args.exact_timeout, prepare=prepare_auto, prepare_args=(d,))
                if status == "ok":
                    row.update({"auto_seconds": out["seconds"], "auto_method": out["method"],
                                "auto_rss_peak_extra_mib": out["rss_peak_extra_mib"]})
                else:
                    row["auto_note"] = status_text(status, out, args.exact_timeout)
            elif "bracket_seconds" in row:
                row.update({"auto_seconds": row["bracket_seconds"], "auto_method": "sinkhorn",
                            "auto_rss_peak_extra_mib": row["bracket_rss_peak_extra_mib"]})
            reason = exact_skip_reason(n, args, machine)
            if reason is None:
                status, out = run_in_child(child_emd2, (n, d), timeout=args.exact_timeout,
                                                  prepare=prepare_pot, prepare_args=(d,))
                if status == "ok":
                    row.update({f"emd2_{k}": v for k, v in out.items()})
                else:
                    row["emd2_note"] = status_text(status, out, args.exact_timeout)
                    if status == "timeout":
                        row["emd2_timed_out_after"] = args.exact_timeout
            else:
                row["emd2_note"] = reason
            if n <= args.max_pot_sinkhorn_n and "bracket_eps" in row:
                status, out = run_in_child(child_pot_sinkhorn, (n, d, row["bracket_eps"], args.pot_max_iter),
                                                  timeout=args.pot_timeout, prepare=prepare_pot, prepare_args=(d,))
                if status == "ok":
                    row.update({f"pot_sinkhorn_{k}": v for k, v in out.items()})
                else:
                    row["pot_sinkhorn_note"] = status_text(status, out, args.pot_timeout)
            elif "bracket_eps" in row:
                row["pot_sinkhorn_note"] = f"skipped: n > --max-pot-sinkhorn-n {args.max_pot_sinkhorn_n}"
            exact = row.get("emd2_value")
            if exact:
                if "bracket_upper" in row:
                    row["upper_over_exact_minus_1"] = row["bracket_upper"] / exact - 1.0
                    row["lower_over_exact_minus_1"] = row["bracket_lower"] / exact - 1.0
                    if row.get("upper_bound") is not None:
                        row["upper_bound_over_exact_minus_1"] = row["upper_bound"] / exact - 1.0
                if "pot_sinkhorn_value" in row:
                    row["pot_sinkhorn_over_exact_minus_1"] = row["pot_sinkhorn_value"] / exact - 1.0
                if "bracket_seconds" in row:
                    row["emd2_over_bracket_seconds"] = row["emd2_seconds"] / row["bracket_seconds"]
                if "auto_seconds" in row:
                    row["emd2_over_auto_seconds"] = row["emd2_seconds"] / row["auto_seconds"]
            rows.append(row)
            print(grid_line(row), flush=True)
    return rows


def grid_line(row: dict[str, Any]) -> str:
    parts = [f"n={row['n']:>6} d={row['d']:>4}"]
    if "bracket_seconds" in row:
        parts.append(f"bracket {row['bracket_seconds']:.3g} s, {row['bracket_rss_peak_extra_mib']:.0f} MiB, "
                     f"width {100 * row['bracket_relative_width']:.2f}%")
    else:
        parts.append(f"bracket {row.get('bracket_note')}")
    parts.append(f"emd2 {row['emd2_seconds']:.3g} s" if "emd2_seconds" in row else f"emd2 {row.get('emd2_note')}")
    if "pot_sinkhorn_seconds" in row:
        parts.append(f"POT sinkhorn_log {row['pot_sinkhorn_seconds']:.3g} s ({row['pot_sinkhorn_iterations']} it)")
    elif "pot_sinkhorn_note" in row:
        parts.append(f"POT sinkhorn_log {row['pot_sinkhorn_note']}")
    return "  ".join(parts)


def run_scale_up(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    n = args.scale_min_n
    while n <= args.scale_max_n:  # every n gets the same time budget; a run cut by it reports its width
        timeout = args.scale_seconds + (120 if args.quick else 600)  # the solver checks its budget between passes
        backend = "chunked" if args.scale_device == "cpu" else "auto"
        status, out = run_in_child(child_bracket, (n, args.scale_dim, backend, args.scale_seconds, False, False, args.scale_device),
                                   timeout=timeout, prepare=prepare_bracket, prepare_args=(args.scale_dim,))
        row: dict[str, Any] = {"n": n, "d": args.scale_dim, "device": args.scale_device, "backend": backend,
                               "tensorized_would_need_gib": 12 * n * n / 2**30}
        if status == "ok":
            row.update(out)
            print(f"scale-up n={n:>7} d={args.scale_dim}: {out['seconds']:.3g} s, peak +{out['rss_peak_extra_mib']:.0f} MiB, "
                  f"width {100 * out['relative_width']:.2f}%, converged {out['converged']}", flush=True)
        else:
            row["note"] = status_text(status, out, timeout)
            print(f"scale-up n={n}: {row['note']}", flush=True)
        rows.append(row)
        if status != "ok" or out["rss_peak_mib"] > MEMORY_LIMIT_GIB * 1024:
            break  # the next n would not fit
        n *= 2
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n <= 4096, POT sinkhorn n <= 1024, scale-up n = 8192 only")
    parser.add_argument("--sizes", type=int, nargs="+", help="n values (default 256 1024 4096 16384; quick: up to 4096)")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784])
    parser.add_argument("--max-exact-n", type=int, help="largest n for ot.emd2 (default 16384; quick 4096)")
    parser.add_argument("--exact-timeout", type=float, help="seconds per exact solve (default 900; quick 120)")
    parser.add_argument("--max-pot-sinkhorn-n", type=int, help="largest n for POT's sinkhorn (default 1024: above it, at the bracket's eps, it "
                        "runs out of its 1000 iterations after minutes; docs/BENCHMARKS.md section 8)")
    parser.add_argument("--pot-max-iter", type=int, default=1000, help="POT sinkhorn numItermax (default 1000, POT's)")
    parser.add_argument("--pot-timeout", type=float, help="seconds per POT sinkhorn run (default 600; quick 120)")
    parser.add_argument("--upper-max-n", type=int, help="largest n of the separate sinkhorn_upper_bound run (default 4096; quick 1024)")
    parser.add_argument("--bracket-seconds", type=float, help="bracket time budget (max_seconds; default 600; quick 20)")
    parser.add_argument("--scale-dim", type=int, default=64)
    parser.add_argument("--scale-min-n", type=int, help="first n of the scale-up (default 16384; quick 8192)")
    parser.add_argument("--scale-max-n", type=int, help="largest n of the scale-up (default 32768; quick 8192)")
    parser.add_argument("--scale-seconds", type=float, help="time budget per scale-up n (default 300; quick 45)")
    parser.add_argument("--scale-device", default="cpu", help="device of the scale-up: cpu (chunked backend) or cuda (auto)")
    parser.add_argument("--no-scale-up", action="store_true")
    args = common.parse_benchmark_arguments(parser)
    q = args.quick
    defaults = dict(sizes=[256, 1024, 4096] if q else [256, 1024, 4096, 16384], max_exact_n=4096 if q else 16384,
                    exact_timeout=120.0 if q else 900.0, max_pot_sinkhorn_n=1024,
                    pot_timeout=120.0 if q else 600.0, upper_max_n=1024 if q else 4096, scale_min_n=8192 if q else 16384,
                    bracket_seconds=20.0 if q else 600.0, scale_max_n=8192 if q else 32768,
                    scale_seconds=45.0 if q else 300.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    start = time.time()
    machine = machine_at_start()
    rows = run_grid(args, machine)
    scale = [] if args.no_scale_up else run_scale_up(args)
    elapsed = time.time() - start
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quick")}
    settings.update(tol=TOL, cost=COST, clouds="x ~ N(0, I_d), y ~ N((1,...,1)/sqrt(d), I_d)")
    payload = common.result_payload(NAME, q, settings, rows, {"verdicts": verdicts(rows)}, machine, elapsed)
    payload["scale_up"] = scale
    stem = common.publish(payload, table(payload), args.out, {"": rows, "_scale_up": scale})
    plot(payload, stem + ".png")
    print(f"wrote {stem}.png")


if __name__ == "__main__":
    main()
