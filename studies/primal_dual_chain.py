"""The inequality chain of the primal-dual link, measured on trained PrimalDual models (docs/theory.md 4.1).

For c = l2 (a metric; per sample, the Euclidean norm of the flattened difference) and lambda > 0:

    dual  GAN_{lambda f}(P_X, G; H_c)  <=  primal  fWAE_{c,lambda}(P_X, G)  <=  W_c(P_X, P_G)
                                                                           <=  upper (certified Sinkhorn)

For every (dataset, divergence f, lambda, seed) one PrimalDual (alpha from the dataset's config, a
Gaussian encoder, `primal_estimator="monte_carlo"`) is trained, and every `eval_every` epochs and
at the end every quantity of the chain is computed in float64 on the same held-out points and the
same generated points (`studies.chain.evaluation`: dual raw and certified, primal with the
critic-free Monte Carlo D_f and with the latent critic's estimate, exact W_c, certified bracket).
The certified inequalities (dual_cert <= W_c(X, Y), lower <= W_c <= upper) are theorems on those
samples: the script checks them at every evaluation and raises if one fails (a bug).

What lambda should do: GAN_{lambda f}(H_c) = inf_P' W_c(P_X, P') + lambda D_f(P' || P_G) is at most
lambda D_f(P_X || P_G) and tends to W_c(P_X, P_G) as lambda grows (WGAN); the f-WAE is at most its
value at a good encoder and tends to the constrained WAE, equal to W_c(P_X, P_G) for a deterministic
G with a rich stochastic encoder. Where the trained values fall short of these limits, the study
computes what could cause it rather than guessing:
- the critic class h = lambda g_f(v / lambda), Lip(v) <= 1, may not reach W_c at all (slope of g_f
  below 1): `ceiling` computes its best value on a Gaussian shift, without training;
- a spectrally normalised network is flatter than the steepest 1-Lipschitz functions: the median
  |grad h| over the held-out and generated points is reported (an optimal critic has slope 1 along
  the transport rays);
- the critic trained beside a moving generator is a weak point of the sup that defines the dual,
  and the encoder a weak point of the inf that defines the primal: at the end, `refinement` runs
  `refine_steps` more critic steps and `encoder_steps` more encoder steps (critic-free estimate,
  continuation in lambda, best encoder kept) against the FROZEN final G; the chain table shows the
  values after them, the diagnostics table the values before;
- the Monte Carlo D_f of the n held-out codes' mixture is biased upwards when the encoder's sigma is
  small next to the spacing of the codes: on the 2-D data it is also computed for the codes of
  16,000 fresh points of the known mixture (`primal MC (16k codes)`);
- the encoder trained on the latent critic's estimate (a lower estimate it can exploit) can shrink
  its sigma until the critic-free D_f explodes: `--training_estimator monte_carlo` trains the
  encoders on the batch mixture's critic-free estimate instead (files `*_mc*`);
- W_c between n = 1000 points is an upward-biased estimate of W_c(P_X, P_G) (docs/theory.md 5.1):
  on the 2-D data the table adds `W_c (4096 pts)` between fresh data and model points, and
  `W_c(X, X') floor`, W_c between two n-point samples of the data itself (population value 0).

The 2-D data: the ring of 8 Gaussians (radius 2) of configs/primal_dual_gaussians.yaml with std 0.1
(`--ring_std`; the config's 0.02 makes near-atoms that an injective map from N(0, I_2) must stretch
50-fold). Every 2-D model uses the `InjectiveGenerator` (`studies.chain.generator`: injective by
construction, certified from exact operator norms), since the population f-WAE reaches W_c only
through an encoder that inverts G; `--generator mlp` uses the config's MLP instead, which can fold.
Checked after training: det dG/dz has one sign at 20,000 prior draws (2-D); for digits (8 -> 64, the
config's conv decoder) the smallest singular value of dG/dz at 1,000 draws is positive.

With the generator comparison (unless `--no-generators`): W_c to held-out data reached with the same
generator network and budget by PrimalDual alpha = 1 (the f-WAE), alpha = 0 (the Lipschitz f-GAN),
the config's alpha (at `--compare_divergence`, `--compare_lambda`), and the SinkhornGenerator (its
entropic OT loss in c = l2).

    python -m studies.primal_dual_chain --quick --workers 2   # 1 seed, short runs
    python -m studies.primal_dual_chain --workers 2            # 3 seeds, the configs' epochs

Writes studies/results/primal_dual_chain[_maxmin][_mc][_quick].md (the printed tables), .csv (one row
per run, final evaluation), _summary.csv (mean and spread over seeds per configuration),
_history.csv (the curves), _generators.csv, .json (everything, with the settings; `--replot`
rebuilds the tables and plots from it), _<dataset>.png (the curves per configuration, first seed)
and _lambda.png (dual / W_c and primal / W_c against lambda). docs/STUDIES.md reads the results.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import common
from benchmarks.machine import machine_info
from studies.chain.report import describe, write_outputs
from studies.chain.settings import CONFIGS, COST, FULL, QUICK, RING_STD, load_settings
from studies.chain.training import train_one
from studies.common import RESULTS


def make_jobs(args: argparse.Namespace, plan: dict) -> list[dict]:
    """The grid (dataset x seed x divergence x lambda) and, per dataset and seed, the generator comparison."""
    jobs = []
    for dataset in args.datasets:
        config_alpha = float(load_settings(dataset)[0]["alpha"])
        base = dict(dataset=dataset, epochs=args.epochs or plan["epochs"][dataset],
                    train_batches=plan["train_batches"][dataset], centre=True,
                    config_alpha=config_alpha, compare_divergence=args.compare_divergence,
                    compare_lambda=args.compare_lambda, first_seed=args.seeds[0], ring_std=args.ring_std,
                    generator=args.generator, critic_activation=args.critic_activation,
                    training_estimator=args.training_estimator,
                    refine_steps=plan["refine_steps"] if args.refine_steps is None else args.refine_steps,
                    encoder_steps=plan.get("encoder_steps", {}).get(dataset, 0) if args.encoder_steps is None
                    else args.encoder_steps,
                    encoder_batch=args.encoder_batch)
        base["eval_every"] = min(args.eval_every or plan["eval_every"], base["epochs"])
        for seed in args.seeds:
            for divergence in args.divergences:
                for lam in args.lambdas:
                    jobs.append({**base, "kind": "primal_dual", "divergence": divergence, "lambda": lam,
                                 "alpha": config_alpha, "seed": seed, "injectivity": True, "grid": True})
            if not args.no_generators:
                alphas = [1.0, 0.0] + ([] if args.compare_divergence in args.divergences
                                       and args.compare_lambda in args.lambdas else [config_alpha])
                for alpha in alphas:
                    jobs.append({**base, "kind": "primal_dual", "divergence": args.compare_divergence,
                                 "lambda": args.compare_lambda, "alpha": alpha, "seed": seed, "injectivity": False,
                                 "grid": False, "encoder_steps": 0})  # only W_c is reported: G is what counts
                jobs.append({**base, "kind": "sinkhorn", "divergence": None, "lambda": None, "alpha": None,
                             "seed": seed, "grid": False})
    return jobs


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, short runs")
    parser.add_argument("--datasets", nargs="+", default=["gaussians", "digits"], choices=sorted(CONFIGS))
    parser.add_argument("--divergences", nargs="+", help="registry rows (default kl jensen_shannon pearson)")
    parser.add_argument("--lambdas", type=float, nargs="+", help="lambda values (default 0.1 1 10 100)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: quick 6 / 10, full the configs')")
    parser.add_argument("--eval_every", type=int, help="epochs between evaluations of the chain (quick 3, full 5)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes, one core each")
    parser.add_argument("--no-generators", dest="no_generators", action="store_true",
                        help="skip the alpha = 1 / alpha = 0 / SinkhornGenerator comparison")
    parser.add_argument("--compare_divergence", default="kl", help="f of the alpha comparison (default kl)")
    parser.add_argument("--compare_lambda", type=float, default=10.0, help="lambda of the alpha comparison")
    parser.add_argument("--ring_std", type=float, default=RING_STD, help="std of each Gaussian of the 2-D ring")
    parser.add_argument("--generator", choices=["injective", "mlp"], default="injective",
                        help="2-D generator: InjectiveGenerator (injective by construction) or the config's MLP")
    parser.add_argument("--refine_steps", type=int, help="critic-only steps against the frozen final G (quick 300, "
                        "full 2000; 0: none)")
    parser.add_argument("--encoder_steps", type=int, help="encoder-only steps against the frozen final G, with "
                        "continuation in lambda (quick 2000 / 1000 for gaussians / digits, full 6000 / 4000; 0: none)")
    parser.add_argument("--encoder_batch", type=int, default=1000, help="training points per encoder refinement step")
    parser.add_argument("--critic_activation", choices=["leaky_relu", "maxmin"],
                        help="data critic activation (default: the configs'); maxmin writes primal_dual_chain_maxmin*")
    parser.add_argument("--training_estimator", choices=["critic", "monte_carlo"], default="critic",
                        help="D_f estimate the encoders descend (PrimalDual's training_estimator); monte_carlo "
                        "(no latent adversary) writes primal_dual_chain*_mc*")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--replot", metavar="JSON", help="no training: rebuild the tables, files and plots from a "
                        "JSON this script wrote")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    plan = QUICK if args.quick else FULL
    args.divergences = args.divergences or plan["divergences"]
    args.lambdas = args.lambdas or plan["lambdas"]
    args.seeds = args.seeds or plan["seeds"]
    args.command = common.command_line()
    if args.replot:
        payload = common.read_json(args.replot)
        if payload is None or "runs" not in payload:
            raise FileNotFoundError(f"--replot needs a JSON written by this script (with its 'runs'), got {args.replot!r}.")
        results, machine, elapsed = payload["runs"], payload["machine"], payload["wall_seconds"]
        for key in ("quick", "datasets", "divergences", "lambdas", "seeds", "compare_divergence", "compare_lambda",
                    "critic_activation", "training_estimator"):
            setattr(args, key, payload["settings"].get(key, getattr(args, key)))
        plan, args.command = payload["settings"]["plan"], payload["command"]
    else:
        results, machine, elapsed = run_jobs(args, plan)
    write_outputs(results, args, plan, machine, elapsed)


def run_jobs(args: argparse.Namespace, plan: dict) -> tuple[list[dict], dict, float]:
    """Train and evaluate every job (in `args.workers` processes); returns (results, machine, seconds)."""
    common.quiet_worker(1)
    machine = machine_info()
    jobs = make_jobs(args, plan)
    print(f"{len(jobs)} runs on {args.workers} worker(s): datasets {args.datasets}, divergences {args.divergences}, "
          f"lambdas {args.lambdas}, seeds {args.seeds}; cost c = {COST}", flush=True)
    start = time.time()
    results = []
    for job, r in zip(jobs, common.map_in_workers(train_one, jobs, args.workers)):
        r.update({k: job[k] for k in ("config_alpha", "compare_divergence", "compare_lambda", "first_seed", "grid")})
        results.append(r)
        f = r["final"]
        extra = "" if r["kind"] == "sinkhorn" else (
            f"dual cert {f['dual_cert']:.3f} raw {f['dual_raw']:.3f} primal MC {f['primal_mc']:.3f} "
            f"critic {f['primal_critic']:.3f} ")
        print(f"[{len(results)}/{len(jobs)}] {describe(r)}: {extra}W_c {f['w_exact']:.3f} "
              f"[{f['w_lower']:.3f}, {f['w_upper']:.3f}] ({r['seconds']:.0f} s)", flush=True)
    return results, machine, time.time() - start


if __name__ == "__main__":
    main()
