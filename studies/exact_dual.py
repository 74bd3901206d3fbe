"""The exact dual side of the chain over lambda, against trained critics (docs/theory.md 4.1, 7).

On samples X (held-out data, n points) and Y (n samples of G) the dual of the primal-dual link has an
exact value, the best 1-Lipschitz f-GAN critic's:

    V = GAN_{lambda f}(X, Y; H_c) = min over P' of W_c(X, P') + lambda D_f(P' || Y),

with a certified bracket link_lower <= V <= link_upper (`transport.inf_convolution_bracket`). For every
(data set, f, lambda) a PrimalDual is trained by the chain study's recipe (`studies.chain`: MaxMin data
critic, encoder trained on the critic-free Monte Carlo estimate, 300 critic steps against the frozen
final G; the chain's encoder refinement is off by default, `--encoder_steps` turns it on: it costs
about 0.1-0.2 s a step on one core and only moves the primal) and evaluated on the same (X, Y):

- the exact dual bracket [link_lower, link_upper] and the certified W bracket (and POT's exact W_c);
- the trained critic's dual value (raw) and its certified value (`Critic.certified_value`);
- the critic-free (Monte Carlo) primal and the latent critic's primal;
- the fraction of the exact dual the certified critic reaches, dual_cert / link_upper (a lower bound
  on dual_cert / V);
- the theorems of the dual side on these samples, checked at every run: dual_cert <= V (the
  certified critic is in H_c) and V <= W_c(X, Y) + lambda f(1) (take P' = Y).

Since G changes with lambda, each data set's reference run (kl, `--fixed_lambda`) also evaluates V at
every lambda and f on its FIXED samples, for its trained G and for the same G at initialisation: the
limit V -> W_c(X, Y) as lambda grows, on the same samples. On that fixed G, part 5
(`studies.exact.potential_fit`) trains fresh critics with the same number of steps, plainly or by
regression onto the exact potentials, and compares their certified values with V.

Data: the ring of 8 Gaussians (std 0.1, injective G; as the chain study), the 8x8 digits (180 held-out),
and an MNIST subset (`--mnist_dir`, the first 10,000 training images, the first 1,000 validation images
held out; the digits config's model with encoder / decoder width 16, 400 steps).

    python -m studies.exact_dual --workers 2            # the default plan (run time: docs/STUDIES.md section 9)
    python -m studies.exact_dual --quick --workers 2    # smoke test, 1-2 min

Writes studies/results/exact_dual[_quick].md (the tables), .csv (one row per trained run), _fixed.csv
(the fixed generators), _fit.csv (part 5), .json (everything, with the settings) and .png (one panel
per data set against lambda; second row: the fixed G). docs/STUDIES.md section 9 reads them.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import common
from benchmarks.machine import machine_info
from benchmarks.quality_runs import default_mnist_dir
from studies.common import RESULTS

NAME = "exact_dual"
DATASETS = ["gaussians", "digits", "mnist"]
DATA = {  # per data set: held-out points, training (the chain's quick recipe), refinements
    "gaussians": {"n_eval": 1000, "epochs": 6, "train_batches": 50, "refine_steps": 300, "encoder_steps": 0,
                  "encoder_batch": 1000},
    "digits": {"n_eval": 180, "epochs": 10, "train_batches": None, "refine_steps": 300, "encoder_steps": 0,
               "encoder_batch": 1000},
    "mnist": {"n_eval": 1000, "n_train": 10_000, "batch_size": 64, "epochs": 4, "train_batches": 100,
              "refine_steps": 300, "encoder_steps": 0, "encoder_batch": 1000, "model_overrides": {"width": 16}},
}
PLANS = {
    "default": {"lambdas": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], "divergences": ["kl", "jensen_shannon"],
                "fit_lambdas": [0.1, 1.0, 10.0, 100.0], "fit_steps": 600, "tol": 0.005, "data": DATA},
    "quick": {"lambdas": [0.1, 100.0], "divergences": ["kl"], "fit_lambdas": [1.0], "fit_steps": 20, "tol": 0.01,
              "data": {"gaussians": {**DATA["gaussians"], "n_eval": 300, "epochs": 1, "train_batches": 20,
                                     "refine_steps": 20, "encoder_steps": 30},
                       "digits": {**DATA["digits"], "epochs": 1, "train_batches": 10, "refine_steps": 20,
                                  "encoder_steps": 30},
                       "mnist": {**DATA["mnist"], "n_eval": 200, "n_train": 1000, "epochs": 1, "train_batches": 10,
                                 "refine_steps": 20}}},
}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: short runs, 2 lambdas, kl only (1-2 min)")
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--divergences", nargs="+", help="rows with a 1-Lipschitz activation (default kl jensen_shannon)")
    parser.add_argument("--lambdas", type=float, nargs="+", help="lambda grid (default 0.01 0.1 1 10 100 1000)")
    parser.add_argument("--fixed_lambda", type=float, default=1.0, help="lambda of each data set's reference run "
                        "(kl), whose G is the fixed generator")
    parser.add_argument("--fit_lambdas", type=float, nargs="*", help="lambdas of part 5 (default 0.1 1 10 100; "
                        "none: --fit_lambdas with no value)")
    parser.add_argument("--fit_steps", type=int, help="critic steps per arm in part 5 (default 600)")
    parser.add_argument("--encoder_steps", type=int, help="encoder refinement steps against the frozen G (the "
                        "chain's refine_encoder; default 0; the chain's quick plan: 2000 ring, 1000 digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes, one core each")
    parser.add_argument("--mnist_dir", default=default_mnist_dir(), help="folder holding MNIST/raw (default: the "
                        "repository's data/ if it holds MNIST/raw, else ../shared/data beside the repository)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--replot", metavar="JSON", help="no training: rebuild the tables and plot from a JSON "
                        "this script wrote")
    return parser.parse_args()


def make_jobs(args: argparse.Namespace, plan: dict) -> list[dict]:
    """(dataset x f x lambda), longest first (MNIST), the reference run of each data set first within it."""
    lambdas = sorted(set(args.lambdas) | {args.fixed_lambda})
    jobs = []
    for dataset in sorted(args.datasets, key=lambda d: DATASETS[::-1].index(d)):
        data = {**plan["data"][dataset], "mnist_dir": args.mnist_dir}
        if args.encoder_steps is not None:
            data["encoder_steps"] = args.encoder_steps
        grid = [(f, lam) for f in args.divergences for lam in lambdas if f == "kl" or lam in args.lambdas]
        grid.sort(key=lambda fl: (fl != ("kl", args.fixed_lambda),))
        for divergence, lam in grid:
            jobs.append({"dataset": dataset, "divergence": divergence, "lambda": lam, "seed": args.seed,
                         "data": data, "tol": plan["tol"], "reference": (divergence, lam) == ("kl", args.fixed_lambda),
                         "lambdas": lambdas, "divergences": args.divergences})
    return jobs


def run(args: argparse.Namespace, plan: dict) -> dict:
    """Phase 1: the trained runs (and the fixed generators); phase 2: part 5 on the fixed generators."""
    from studies.exact.potential_fit import run_fit
    from studies.exact.runs import run_trained

    common.quiet_worker(1)
    machine = machine_info()
    start = time.time()
    jobs = make_jobs(args, plan)
    print(f"{len(jobs)} trained runs on {args.workers} worker(s): datasets {args.datasets}, divergences "
          f"{args.divergences}, lambdas {args.lambdas}; reference run kl, lambda {args.fixed_lambda:g}", flush=True)
    rows, fixed, states = [], [], {}
    for job, out in zip(jobs, common.map_in_workers(run_trained, jobs, args.workers)):
        r = out["row"]
        rows.append(r)
        fixed += out["fixed"]
        if "state" in out:
            states[job["dataset"]] = (job, out["state"])
        where = f"[{len(rows)}/{len(jobs)}] {r['dataset']:<10}{r['divergence']:<15}lambda {r['lambda']:<7g}"
        if "error" in r:
            print(f"{where}FAILED: {r['error']}", flush=True)
            continue
        print(f"{where}exact dual [{r['link_lower']:.4f}, {r['link_upper']:.4f}] W_c {r['w_exact']:.4f} dual cert "
              f"{r['dual_cert']:.4f} ({r['fraction_of_exact']:.2f} of it) primal MC {r['primal_mc']:.4g} "
              f"({r['seconds']:.0f} s, {time.time() - start:.0f} s in all)", flush=True)
    fit_jobs = [{**reference, "divergence": "kl", "lambda": lam, "state": state, "steps": plan["fit_steps"]}
                for dataset, (reference, state) in states.items() for lam in plan["fit_lambdas"]]
    fits = []
    if fit_jobs:
        print(f"part 5: {len(fit_jobs)} critic fits ({plan['fit_steps']} steps per arm) on the fixed generators", flush=True)
    for out in common.map_in_workers(run_fit, fit_jobs, args.workers):
        fits.append(out)
        if "error" in out:
            print(f"[{len(fits)}/{len(fit_jobs)}] {out['dataset']:<10}kl lambda {out['lambda']:<7g}FAILED: {out['error']}")
            continue
        print(f"[{len(fits)}/{len(fit_jobs)}] {out['dataset']:<10}kl lambda {out['lambda']:<7g}exact dual "
              f"[{out['link_lower']:.4f}, {out['link_upper']:.4f}] certified: "
              + ", ".join(f"{arm} {out[f'{arm}_certified']:.4f}" for arm in ("plain", "batch", "init", "oracle"))
              + f" ({out['seconds']:.0f} s, {time.time() - start:.0f} s in all)", flush=True)
    return {"rows": rows, "fixed": fixed, "fits": fits, "machine": machine, "wall_seconds": time.time() - start}


def main() -> None:
    args = parse_arguments()
    plan = dict(PLANS["quick" if args.quick else "default"])
    args.divergences = args.divergences or plan["divergences"]
    args.lambdas = args.lambdas or plan["lambdas"]
    if args.fit_lambdas is not None:
        plan["fit_lambdas"] = args.fit_lambdas
    if args.fit_steps is not None:
        plan["fit_steps"] = args.fit_steps
    from studies.exact.report import write_outputs

    if args.replot:
        payload = common.read_json(args.replot)
        if payload is None or "rows" not in payload:
            raise FileNotFoundError(f"--replot needs a JSON written by this script, got {args.replot!r}.")
        write_outputs(payload, args.out, replot=True)
        return
    results = run(args, plan)
    settings = {**{k: v for k, v in vars(args).items() if k != "replot"}, "plan": plan}
    payload = {"study": NAME, "quick": args.quick, "command": common.command_line(), "settings": settings, **results}
    write_outputs(payload, args.out)


if __name__ == "__main__":
    main()
