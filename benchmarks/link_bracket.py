"""Time of the certified bracket on the exact dual, `transport.inf_convolution_bracket` (docs/theory.md 7),
on 1000 points in 2 and 784 dimensions, for every supported row and several lambda.

Samples: the transport benchmark's Gaussian clouds (x ~ N(0, I_d), y ~ N(mu, I_d), |mu| = 1), n = m
points, cost l2 (the theorem's metric). Each configuration solves to `tol` = 1% with the default
budgets (60 s, backend "auto") and reports the seconds, the Sinkhorn passes, the last eps, the
relative width (upper - lower) / (upper - lambda f(1)) and whether it met `tol`. Beside it: POT's
exact W_l2 on the same samples (`ot.emd2`), and the fraction of W_c the exact dual reaches
(lower / W), which must tend to 1 as lambda grows; the certified Wasserstein bracket's time on the
same samples (`wasserstein_bracket`, cost l2) for scale.

    python -m benchmarks.link_bracket --quick     # lambda = 1 only
    python -m benchmarks.link_bracket             # lambda in {0.1, 1, 10, 100}

Writes benchmarks/results/link_bracket[_quick].{csv,json}.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import common
from benchmarks.machine import machine_at_start
from benchmarks.transport import gaussian_clouds

NAME = "link_bracket"
N = 1000
DIMS = (2, 784)
TOL = 0.01


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ot

    from transport import SUPPORTED_DIVERGENCES, inf_convolution_bracket, wasserstein_bracket

    machine = machine_at_start()
    lambdas = (1.0,) if args.quick else (0.1, 1.0, 10.0, 100.0)
    rows = []
    for d in DIMS:
        x, y = gaussian_clouds(args.n, d)
        exact = float(ot.emd2([], [], ot.dist(x.numpy(), y.numpy(), metric="euclidean")))
        start = time.perf_counter()
        w = wasserstein_bracket(x, y, cost="l2", tol=TOL)
        w_seconds = time.perf_counter() - start
        print(f"d={d}: W_l2 {exact:.4f}, wasserstein_bracket [{w.lower:.4f}, {w.upper:.4f}] in {w_seconds:.2f} s", flush=True)
        for divergence in SUPPORTED_DIVERGENCES:
            for lam in lambdas:
                start = time.perf_counter()
                bracket = inf_convolution_bracket(x, y, divergence, lam, cost="l2", tol=TOL)
                seconds = time.perf_counter() - start
                width = (bracket.upper - bracket.lower) / max(bracket.upper - bracket.floor, 1e-300)
                rows.append({
                    "d": d, "n": args.n, "divergence": divergence, "lambda": lam, "seconds": seconds,
                    "iterations": bracket.iterations, "eps": bracket.eps, "relative_width": width,
                    "converged": bracket.converged, "lower": bracket.lower, "upper": bracket.upper,
                    "w_exact": exact, "lower_over_w": (bracket.lower - bracket.floor) / exact,
                    "w_bracket_seconds": w_seconds,
                })
                print(f"  {divergence:<16} lambda {lam:<6g} {seconds:6.2f} s  width {width:.4f}  "
                      f"lower / W {rows[-1]['lower_over_w']:.3f}", flush=True)
    settings = {"n": args.n, "dims": list(DIMS), "tol": TOL, "lambdas": list(lambdas), "cost": "l2"}
    return {"rows": rows, "settings": settings, "machine": machine}


def table(result: dict[str, Any]) -> str:
    header = ["d", "divergence", "lambda", "seconds", "passes", "width", "met tol", "(lower - lambda f(1)) / W",
              "W bracket s"]
    body = [[r["d"], r["divergence"], common.fmt(r["lambda"], "g"), common.fmt(r["seconds"], ".2f"), r["iterations"],
             common.fmt(r["relative_width"], ".4f"), "yes" if r["converged"] else "no",
             common.fmt(r["lower_over_w"], ".3f"), common.fmt(r["w_bracket_seconds"], ".2f")] for r in result["rows"]]
    slowest = max(result["rows"], key=lambda r: r["seconds"])
    return "\n".join([
        common.markdown_table(header, body), "",
        f"{result['settings']['n']} points each side, cost l2, tol {TOL}; W = POT's exact W_l2 on the same samples. "
        f"Slowest: {slowest['divergence']} at lambda {slowest['lambda']:g}, d = {slowest['d']}: "
        f"{slowest['seconds']:.2f} s. Every bracket met tol: "
        f"{'yes' if all(r['converged'] for r in result['rows']) else 'NO'}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lambda = 1 only")
    parser.add_argument("--n", type=int, default=N, help="points on each side")
    args = common.parse_benchmark_arguments(parser)
    start = time.time()
    result = run(args)
    payload = common.result_payload(NAME, args.quick, result["settings"], result["rows"], {}, result["machine"],
                                    time.time() - start)
    common.publish(payload, table(payload), args.out)


if __name__ == "__main__":
    main()
