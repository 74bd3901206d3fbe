"""The dual side of the chain as lambda grows, against a POPULATION reference for W_c (docs/theory.md 4.1, 5.1).

The chain study divides the dual value by W_c between 1000 held-out points and 1000 model points.
That empirical W_c is biased upwards (E W_c(samples) >= W_c(P_X, P_G), docs/theory.md 5.1), so
"dual / W_c" there understates how close the dual gets. Here the ring is sampled afresh (its law
is known), so:

- the critic of a trained PrimalDual (the chain's quick recipe: injective G, MaxMin critic, MC
  training estimator) is refined for `--critic_steps` steps on batches of 1000 FRESH data points
  against 1000 fresh model points, G frozen;
- its certified dual value is averaged over `--repeats` fresh pairs of `--eval_points` points: an
  unbiased estimate of the critic's population value, which is <= GAN_{lambda f}(P_X, P_G; H_c) <=
  W_c(P_X, P_G) (a theorem for the certified critic);
- W_c(P_X, P_G) is estimated from exact W_c(X_N, Y_N) (optimal assignment, scipy) at N = 500 ... 4000
  (averaged over a few fresh pairs for the smaller N),
  extrapolated to N = infinity by least squares on W_N = W + a / sqrt(N) and on W_N = W + a log(N) / sqrt(N)
  (the 2-D rates); the two fits bracket the estimate.

    python -m studies.dual_limit [--workers 2] [--lambdas 0.1 1 10 100] [--divergences kl jensen_shannon pearson]

Writes studies/results/dual_limit.{md,csv,json}; docs/STUDIES.md reads them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from benchmarks import common
from benchmarks.machine import describe_machine, machine_info
from studies.chain.refinement import train_all_but_generator
from studies.chain.training import train_quick_generator
from studies.common import RESULTS, report_title, ring_points
from studies.transport_encoder import assignment

NAME = "dual_limit"
SIZES = [500, 1000, 2000, 4000]
DRAWS_PER_SIZE = {500: 4, 1000: 4, 2000: 2, 4000: 1}  # W_N averaged over this many fresh pairs
BATCH = 1000


def extrapolate(sizes: list[int], values: list[float]) -> dict[str, float]:
    """W at N = infinity from W_N = W + a r(N), least squares, for r = 1/sqrt(N) and log(N)/sqrt(N)."""
    n, w = np.asarray(sizes, dtype=float), np.asarray(values, dtype=float)
    out = {}
    for name, rate in (("sqrt", 1 / np.sqrt(n)), ("log_sqrt", np.log(n) / np.sqrt(n))):
        design = np.stack([np.ones_like(n), rate], axis=1)  # (K, 2)
        out[f"w_inf_{name}"] = float(np.linalg.lstsq(design, w, rcond=None)[0][0])
    return out


def run_one(job: dict) -> dict:
    """Train G at (f, lambda), refine its critic on fresh data, and measure the dual against W_c."""
    common.quiet_worker(1)
    start = time.time()
    model, datamodule = train_quick_generator(job["divergence"], job["lambda"], job["seed"])

    def fresh_data(n: int, seed: int) -> torch.Tensor:
        return ring_points(datamodule.centers, datamodule.std, n, seed)

    def fresh_model(n: int, seed: int) -> torch.Tensor:
        with torch.no_grad():
            return model.decode(torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed)))

    optimizer = torch.optim.Adam(model.critic.parameters(), lr=model.hparams.critic_lr, betas=tuple(model.hparams.betas))
    train_all_but_generator(model)
    torch.manual_seed(job["seed"])
    for step in range(job["critic_steps"]):
        loss = model.critic.loss(fresh_data(BATCH, 10**6 + step), fresh_model(BATCH, 2 * 10**6 + step))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    bound = model.critic.lipschitz_bound()
    duals = [float(model.critic.certified_value(fresh_data(job["eval_points"], 3 * 10**6 + k),
                                              fresh_model(job["eval_points"], 4 * 10**6 + k)))
             for k in range(job["repeats"])]
    w_by_size = [statistics.mean(
        assignment(fresh_data(n, 5 * 10**6 + 10 * n + k).double(), fresh_model(n, 6 * 10**6 + 10 * n + k).double())[1]
        for k in range(DRAWS_PER_SIZE[n])) for n in SIZES]
    x, y = fresh_data(SIZES[-1], 5 * 10**6 + 10 * SIZES[-1]), fresh_model(SIZES[-1], 6 * 10**6 + 10 * SIZES[-1])
    same_points = float(model.critic.certified_value(x, y))  # the theorem's check on these samples
    return {"divergence": job["divergence"], "lambda": job["lambda"], "seed": job["seed"],
            "lipschitz_bound": bound, "dual": statistics.mean(duals), "dual_sd": statistics.stdev(duals),
            "dual_same_points": same_points, **{f"w_{n}": w for n, w in zip(SIZES, w_by_size)},
            **extrapolate(SIZES, w_by_size), "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--divergences", nargs="+", default=["kl", "jensen_shannon", "pearson"])
    parser.add_argument("--critic_steps", type=int, default=3000)
    parser.add_argument("--eval_points", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    jobs = [{"divergence": f, "lambda": lam, "seed": args.seed, "critic_steps": args.critic_steps,
             "eval_points": args.eval_points, "repeats": args.repeats}
            for f in args.divergences for lam in args.lambdas]
    start = time.time()
    rows = []
    for row in common.map_in_workers(run_one, jobs, args.workers):
        rows.append(row)
        print(f"{row['divergence']} lambda {row['lambda']:g}: dual {row['dual']:.4f}, W_4000 {row['w_4000']:.4f}, "
              f"W_inf [{row['w_inf_log_sqrt']:.4f}, {row['w_inf_sqrt']:.4f}] ({row['seconds']:.0f} s)", flush=True)
    write_outputs(rows, args, time.time() - start)


def write_outputs(rows: list[dict], args: argparse.Namespace, elapsed: float) -> None:
    machine = machine_info()
    body = []
    for r in rows:
        low, high = sorted((r["w_inf_log_sqrt"], r["w_inf_sqrt"]))
        held = "yes" if r["dual_same_points"] <= r["w_4000"] else "NO"
        body.append([r["divergence"], f"{r['lambda']:g}", f"{r['dual']:.4f} ± {r['dual_sd']:.4f}",
                     f"{r['lipschitz_bound']:.3f}", " ".join(f"{r[f'w_{n}']:.3f}" for n in SIZES),
                     f"[{low:.3f}, {high:.3f}]", f"{r['dual'] / high:.2f} - {r['dual'] / low:.2f}",
                     f"{r['dual'] / r['w_4000']:.2f}", held])
    text = "\n".join([
        report_title(NAME),
        "",
        f"Critic refined for {args.critic_steps} steps on fresh batches of {BATCH}; dual = certified dual value, "
        f"mean ± sd over {args.repeats} fresh pairs of {args.eval_points} points; W_N exact at N = "
        f"{', '.join(map(str, SIZES))} (mean over {', '.join(map(str, DRAWS_PER_SIZE.values()))} fresh pairs); W_inf: the two extrapolations to N = infinity.",
        "",
        common.markdown_table(["f", "lambda", "dual (population estimate)", "Lip bound", "W_N at N = " + " / ".join(map(str, SIZES)),
                               "W_inf (two fits)", "dual / W_inf", "dual / W_4000", "dual <= W_c on the same 4000 points"],
                              body),
        "",
        f"{describe_machine(machine)}; {elapsed:.0f} s.",
    ])
    common.write_report(os.path.join(args.out, NAME), text, rows, {
        "settings": vars(args), "sizes": SIZES, "rows": rows, "machine": machine, "seconds": elapsed})


if __name__ == "__main__":
    main()
