"""How low the critic-free primal of a GAUSSIAN encoder can go for a fixed G (docs/theory.md 3.2, 4.5).

The primal fWAE_{c,lambda}(P_X, G) = inf_E E c(x, G(E(x))) + lambda D_f(Q_Z || P_Z) is <= W_c(P_X, P_G)
because the encoder class is rich: the encoder that follows an optimal coupling of P_X and P_G back
through G has Q_Z = P_Z and costs exactly W_c. On N points P_X^N that encoder sends x_i to a cell of
P_Z of mass 1/N, which no Gaussian represents, and the critic-free estimate of the primal measures
D_f of the mixture of the N codes' Gaussians. This script measures what that costs, with no training
of the encoder at all: the TRANSPORT ENCODER of width s,

    sigma = optimal assignment of X = (x_1..x_N) to Y = (G(z_1)..G(z_N)), z_j ~ P_Z  (scipy, exact),
    Q_s(z | x_i) = N(sqrt(1 - s^2) z_sigma(i), s^2 I),
    primal(s, lambda) = (1/N) sum_i E c(x_i, G(z)), z ~ Q_s(. | x_i)  +  lambda D_f(Q_N,s || P_Z),

with Q_N,s = (1/N) sum_j N(sqrt(1 - s^2) z_j, s^2 I) (its covariance is about I) and D_f from
`monte_carlo_divergence`. s -> 0 gives recon W_N = W_c(X, Y) but a spiky mixture; s = 1 is the
collapsed encoder Q(z|x) = P_Z (D_f = 0, recon = E c(X, G(Z)) for an independent Z). Each s is a
feasible Gaussian encoder, so min_s primal(s, lambda) is a value the Gaussian class reaches on P_X^N
(an upper bound on its inf, not the inf). The table gives it against lambda and N, to see whether
"the primal tends to W_c as lambda grows" holds for a Gaussian encoder and a critic-free estimate
at a fixed N, or only when N grows with lambda.

G is the chain study's injective generator, trained by its quick recipe
(`studies.chain.training.train_quick_generator`: ring of 8 Gaussians, std 0.1, MC training
estimator, MaxMin critic) at one (f, lambda).

    python -m studies.transport_encoder [--sizes 500 1000 2000 4000] [--train_lambda 10]

Writes studies/results/transport_encoder.{md,csv,json,png}; docs/STUDIES.md reads them.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.machine import describe_machine, machine_info
from studies.chain.training import train_quick_generator
from studies.common import RESULTS, report_title, ring_points

NAME = "transport_encoder"
WIDTHS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0]
DRAWS_PER_POINT = 8
MC_SAMPLES = 8192


def assignment(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, float]:
    """The optimal assignment of x (N, D) to y (N, D) for c = l2, and its mean cost = W_c(x, y) exactly
    (uniform weights, equal sizes: an optimal plan is a permutation, Birkhoff)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.double(), y.double()).numpy()  # (N, N)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)], float(cost[rows, cols].mean())


@torch.no_grad()
def transport_encoder_terms(generator: Any, x: torch.Tensor, z: torch.Tensor, divergences: list[str],
                            seed: int) -> list[dict]:
    """recon(s) and D_f(Q_N,s || P_Z) for every width s in WIDTHS and every f. x (N, D) data, z (N, d_z)
    latent draws already permuted so that z[i] is the code assigned to x[i]."""
    from maths.gaussian_codes import monte_carlo_divergence

    rows = []
    for s in WIDTHS:
        gen = torch.Generator().manual_seed(seed)
        mean = math.sqrt(1.0 - s * s) * z  # (N, d_z)
        log_var = torch.full_like(mean, 2.0 * math.log(s))  # (N, d_z)
        codes = mean.repeat(DRAWS_PER_POINT, 1) + s * torch.randn(DRAWS_PER_POINT * len(z), z.shape[1],
                                                                  generator=gen, dtype=z.dtype)
        recon = float((x.repeat(DRAWS_PER_POINT, 1) - generator(codes.float()).double()).norm(dim=1).mean())
        row = {"width": s, "recon": recon}
        for f in divergences:
            if s == 1.0:  # every component is P_Z itself
                row[f"D_{f}"], row[f"se_{f}"] = 0.0, 0.0
                continue
            estimate = monte_carlo_divergence(f, mean, log_var, MC_SAMPLES, generator=gen)
            row[f"D_{f}"], row[f"se_{f}"] = float(estimate.value), float(estimate.std_error)
        rows.append(row)
    return rows


def best_primal(terms: list[dict], f: str, lambda_: float) -> dict:
    """min over the widths of recon(s) + lambda D_f(s), with its width and parts."""
    scored = [(t["recon"] + lambda_ * t[f"D_{f}"], t) for t in terms]
    value, t = min(scored, key=lambda pair: pair[0])
    return {"primal": value, "width": t["width"], "recon": t["recon"], "divergence": t[f"D_{f}"],
            "se": lambda_ * t[f"se_{f}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000], help="points N")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--divergences", nargs="+", default=["kl", "jensen_shannon", "pearson"])
    parser.add_argument("--train_divergence", default="kl", help="f of the training run that gives G")
    parser.add_argument("--train_lambda", type=float, default=10.0, help="lambda of the training run that gives G")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    common.quiet_worker(common.THREADS)
    start = time.time()
    model, datamodule = train_quick_generator(args.train_divergence, args.train_lambda, args.seed)
    print(f"trained G ({args.train_divergence}, lambda {args.train_lambda:g}) in {time.time() - start:.0f} s")

    rows, terms_by_size = [], {}
    for n in args.sizes:
        x = ring_points(datamodule.centers, datamodule.std, n, 1000 + n)
        z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(2000 + n), dtype=torch.float64)
        with torch.no_grad():
            y = model.decode(z.float()).double()  # (N, 2)
        tick = time.time()
        order, w_exact = assignment(x.double(), y)
        terms = transport_encoder_terms(model.decode, x.double(), z[order], args.divergences, args.seed)
        terms_by_size[n] = terms
        collapsed = terms[-1]["recon"]
        print(f"N = {n}: W_c(X, Y) = {w_exact:.4f}, collapsed recon = {collapsed:.4f} ({time.time() - tick:.0f} s)")
        for f in args.divergences:
            for lam in args.lambdas:
                best = best_primal(terms, f, lam)
                rows.append({"N": n, "f": f, "lambda": lam, "w_exact": w_exact, "collapsed": collapsed, **best,
                             "ratio": best["primal"] / w_exact, "collapsed_ratio": collapsed / w_exact})
    elapsed = time.time() - start
    write_outputs(rows, terms_by_size, args, elapsed)


def ratio_table(rows: list[dict], sizes: list[int]) -> str:
    """Rows (f, lambda), one column per N: best primal / W_N (width s*)."""
    keys = sorted({(r["f"], r["lambda"]) for r in rows})
    cell = {(r["f"], r["lambda"], r["N"]): r for r in rows}
    body = [[f, f"{lam:g}", *(f"{cell[f, lam, n]['ratio']:.2f} (s* {cell[f, lam, n]['width']:g})" for n in sizes)]
            for f, lam in keys]
    return common.markdown_table(["f", "lambda", *(f"N = {n}" for n in sizes)], body)


def write_outputs(rows: list[dict], terms_by_size: dict[int, list[dict]], args: argparse.Namespace,
                  elapsed: float) -> None:
    machine = machine_info()
    first = {n: next(r for r in rows if r["N"] == n) for n in args.sizes}
    text = "\n".join([
        report_title(NAME),
        "",
        f"G: the chain's injective generator trained by its quick recipe ({args.train_divergence}, lambda "
        f"{args.train_lambda:g}, seed {args.seed}). Best primal of the transport encoder over widths s in "
        f"{WIDTHS}, divided by W_N = W_c(X, Y) (exact, N data points against N model points).",
        "",
        common.markdown_table(["N", "W_N", "collapsed E c(X, G(Z))", "collapsed / W_N"],
                              [[n, f"{first[n]['w_exact']:.4f}", f"{first[n]['collapsed']:.4f}",
                                f"{first[n]['collapsed_ratio']:.2f}"] for n in args.sizes]),
        "",
        "## min_s primal(s, lambda) / W_N (the width s* that reached it)",
        "",
        ratio_table(rows, args.sizes),
        "",
        f"{describe_machine(machine)}; {elapsed:.0f} s.",
    ])
    stem = os.path.join(args.out, NAME)
    common.write_report(stem, text, rows, {"settings": vars(args), "widths": WIDTHS, "rows": rows,
                                           "terms": {str(n): t for n, t in terms_by_size.items()},
                                           "machine": machine, "seconds": elapsed})
    plot(rows, args, stem + ".png")


def plot(rows: list[dict], args: argparse.Namespace, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(args.divergences), figsize=(4.2 * len(args.divergences), 3.6), squeeze=False)
    for ax, f in zip(axes[0], args.divergences):
        for n in args.sizes:
            mine = sorted((r for r in rows if r["f"] == f and r["N"] == n), key=lambda r: r["lambda"])
            ax.plot([r["lambda"] for r in mine], [r["ratio"] for r in mine], marker="o", label=f"N = {n}")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.axhline(mine[0]["collapsed_ratio"], color="grey", lw=0.8, ls=":", label="collapsed (N max)")
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_title(f"{f}: best Gaussian-encoder primal / W_N")
    axes[0][0].legend(fontsize=8)
    common.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
