"""The chain study's report: the certified checks over every evaluation, the printed tables, and the
files (Markdown, CSV, JSON, PNG). A failed certified inequality is a bug: it is reported and raised."""

from __future__ import annotations

import argparse
import statistics

from benchmarks import common
from studies.chain.ceiling import ceiling_table
from studies.chain.plots import plot_curves, plot_lambda
from studies.chain.settings import BRACKET_TOL, CONFIGS, COST, EVAL_SEED, MC_SAMPLES, NAME
from studies.chain.summary import generator_rows, summarize
from studies.chain.tables import chain_table, checks_table, diagnostics_table, generators_table, lambda_trend


def describe(r: dict) -> str:
    """One run in words: dataset, model and its settings, seed."""
    if r["kind"] == "sinkhorn":
        return f"{r['dataset']:<10}SinkhornGenerator seed {r['seed']}"
    return f"{r['dataset']:<10}{r['divergence']:<15}lambda {r['lambda']:<6g}alpha {r['alpha']:<4g}seed {r['seed']}"


def certified_violations(results: list[dict]) -> tuple[list[str], int]:
    """(the failures of dual_cert <= W_c(X, Y) and of lower <= W_c <= upper, number of evaluations),
    over every evaluation during training and the final one of every run."""
    violations, evaluations = [], 0
    for r in results:
        for row in r["history"] + [r["final"]]:
            evaluations += 1
            where = f"{describe(r)} epoch {row.get('epoch', 'final')}"
            if "theorem_ok" in row and not row["theorem_ok"]:
                violations.append(f"{where}: dual_cert {row['dual_cert']!r} > W_c {row['w_exact']!r}")
            if not row["bracket_ok"]:
                violations.append(f"{where}: W_c {row['w_exact']!r} outside the bracket "
                                  f"[{row['w_lower']!r}, {row['w_upper']!r}]")
    return violations, evaluations


def injectivity_lines(results: list[dict], datasets: list[str]) -> list[str]:
    """One line per dataset on the final generators' injectivity checks."""
    lines = []
    inj = [r for r in results if "injectivity" in r]
    for dataset in datasets:
        rs = [r["injectivity"] for r in inj if r["dataset"] == dataset]
        if rs and "det_same_sign" in rs[0]:
            same = sum(x["det_same_sign"] for x in rs)
            lines.append(f"{dataset}: det dG/dz of one sign at all 20,000 prior draws in {same}/{len(rs)} generators; "
                         f"smallest |det| {min(x['det_abs_min'] for x in rs):.2e}, median "
                         f"{statistics.median(x['det_abs_median'] for x in rs):.2e}")
        elif rs:
            lines.append(f"{dataset}: smallest singular value of dG/dz over 1,000 draws per generator: min "
                         f"{min(x['min_singular_value'] for x in rs):.2e}, median of minima "
                         f"{statistics.median(x['min_singular_value'] for x in rs):.2e}")
    return lines


def report_text(results: list[dict], rows: list[dict], gen_rows: list[dict], ceiling: list[dict],
                args: argparse.Namespace, violations: list[str], evaluations: int, elapsed: float) -> str:
    """The printed report: the chain, diagnostics, checks, lambda trend, ceiling, generators."""
    lam_cols = sorted({c["lambda"] for c in ceiling})
    parts = [
        f"# {NAME}{' (quick)' if args.quick else ''}: {args.command}",
        f"\n## The chain on held-out data (c = {COST}; mean ± sd over seeds {args.seeds}; final evaluation)",
        "dual raw / cert: the trained critic's value on (X, Y), raw and divided by max(1, certified Lipschitz "
        "bound); primal MC: recon + lambda * critic-free Monte Carlo D_f of the held-out codes' mixture; primal "
        "critic: recon + lambda * the latent critic's estimate; W_c exact: POT on the same (X, Y); bracket: "
        "certified Sinkhorn bounds on it.\n",
        chain_table(rows),
        "\n## Diagnostics (mean over seeds)\n",
        diagnostics_table(rows),
        "\n## Which inequalities held: seeds where it held / seeds (mean margin = larger side - smaller side)\n",
        checks_table(rows),
        "\n## lambda trend\n",
        lambda_trend(rows),
        f"\nCertified checks over {evaluations} evaluations (every eval_every epochs, the final one after the "
        "critic and encoder refinements, and the generator comparison): "
        + ("dual_cert <= W_c(X, Y) and lower <= W_c <= upper held at EVERY evaluation."
           if not violations else f"{len(violations)} VIOLATIONS (bugs): see below."),
        "\n## The model's critic class on a Gaussian shift (W_1 = 2; v linear, 1-Lipschitz; quadrature, no "
        "training): best value / W_1\n",
        common.markdown_table(["f", *[f"lambda={lam:g}" for lam in lam_cols]], [
            [name, *[f"{next(c['value_over_w'] for c in ceiling if c['divergence'] == name and c['lambda'] == lam):.3f}"
                     for lam in lam_cols]] for name in args.divergences]),
    ]
    if gen_rows:
        parts += [f"\n## W_c to held-out data reached, same generator network and budget (PrimalDual with "
                  f"{args.compare_divergence}, lambda {args.compare_lambda:g})\n", generators_table(gen_rows)]
    injectivity = injectivity_lines(results, args.datasets)
    if injectivity:
        parts += ["\n## Generator injectivity checks (final generators)\n", *injectivity]
    parts.append(f"\n({elapsed:.0f} s wall clock; {sum(r['seconds'] for r in results):.0f} s of training in all; the "
                 "CPU may be shared: timings are not results.)")
    return "\n".join(parts)


def write_outputs(results: list[dict], args: argparse.Namespace, plan: dict, machine: dict, elapsed: float) -> None:
    """Print the tables, write the files, and raise if a certified inequality failed."""
    violations, evaluations = certified_violations(results)
    rows = summarize(results)
    gen_rows = generator_rows(results)
    ceiling = ceiling_table(args.lambdas, args.divergences)
    text = report_text(results, rows, gen_rows, ceiling, args, violations, evaluations, elapsed)
    print(text, flush=True)

    suffix = "_maxmin" if getattr(args, "critic_activation", None) == "maxmin" else ""
    suffix += "_mc" if getattr(args, "training_estimator", "critic") == "monte_carlo" else ""
    stem = common.result_stem(NAME + suffix, args.quick, args.out)
    flat = [{**{k: r[k] for k in ("dataset", "kind", "divergence", "lambda", "alpha", "seed", "epochs", "batches",
                                  "centre", "critic_centre", "seconds")}, **r["final"], **r.get("injectivity", {})}
            for r in results]
    common.write_csv(stem + ".csv", flat)
    common.write_csv(stem + "_summary.csv", rows)
    common.write_text(stem + ".md", text)
    common.write_csv(stem + "_history.csv", [
        {**{k: r[k] for k in ("dataset", "divergence", "lambda", "alpha", "seed")}, **row}
        for r in results for row in r["history"]])
    if gen_rows:
        common.write_csv(stem + "_generators.csv", gen_rows)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("replot", "command")}, "plan": plan, "cost": COST,
                "eval_seed": EVAL_SEED, "bracket_tol": BRACKET_TOL, "mc_samples": MC_SAMPLES, "configs": CONFIGS}
    payload = common.result_payload(NAME, args.quick, settings, flat, {
        "chain": rows, "generators": gen_rows, "ceiling": ceiling, "violations": violations}, machine, elapsed)
    payload["command"] = args.command  # the training command, also when --replot rebuilt these files
    payload["runs"] = results  # everything, with the curves: --replot rebuilds the tables and plots from it
    common.write_json(stem + ".json", payload)
    for dataset in args.datasets:
        plot_curves(results, dataset, f"{stem}_{dataset}.png")
    plot_lambda(rows, stem + "_lambda.png")
    print(f"wrote {stem}.md (these tables), .csv, _summary.csv, _history.csv, _generators.csv, .json and the PNG plots")

    if violations:
        banner = "!" * 100
        print(f"\n{banner}\nBUG: a certified inequality failed ({len(violations)} times). dual_cert <= W_c(X, Y) is a "
              f"theorem for a critic in H_c on the same samples, and the bracket is certified:\n"
              + "\n".join(violations[:20]) + f"\n{banner}", flush=True)
        raise AssertionError(f"{len(violations)} certified inequalities failed; see above")
