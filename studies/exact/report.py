"""The exact-dual study's report: the tables (Markdown), the result files (CSV, JSON) and the figure.
A failed theorem of the dual side (dual_cert <= V <= W_c + lambda f(1), W_c inside its bracket) is a
bug: it is reported and raised after the files are written."""

from __future__ import annotations

import math
import os

from benchmarks import common
from benchmarks.machine import describe_machine
from studies.exact.potential_fit import ARMS

NAME = "exact_dual"


def num(value: float) -> str:
    """A value of the part-5 table: 4 decimals, or 3 significant digits when huge (a diverged critic)."""
    return common.fmt(value, ".4f" if abs(value) < 1e4 else ".3g")


def positive(values: list[float]) -> list[float]:
    """Values for a log axis: the non-positive ones (a critic below zero) left out as NaN."""
    return [v if v > 0 else math.nan for v in values]


def bracket(lower: float, upper: float, spec: str = ".4f") -> str:
    return f"[{format(lower, spec)}, {format(upper, spec)}]"


def main_table(rows: list[dict]) -> str:
    header = ["data", "f", "lambda", "exact dual [lower, upper]", "W_c exact", "W bracket", "dual cert", "dual raw",
              "Lip bound", "cert / exact dual (>=)", "cert, constant re-fitted (/ exact)", "primal MC", "primal critic",
              "exact dual / W_c", "dual_cert <= V <= W_c"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}", bracket(r["link_lower"], r["link_upper"]),
        f"{r['w_exact']:.4f}", bracket(r["w_lower"], r["w_upper"]), f"{r['dual_cert']:.4f}", f"{r['dual_raw']:.4f}",
        f"{r['lipschitz_bound']:.3f}", f"{r['fraction_of_exact']:.3f}",
        f"{r['dual_cert_shifted']:.4f} ({r['dual_cert_shifted'] / r['link_upper']:.3f})", common.fmt(r["primal_mc"], ".4g"),
        common.fmt(r["primal_critic"], ".4g"), f"{r['link_lower'] / r['w_exact']:.3f}",
        "yes" if r["dual_cert_le_link"] and r["link_le_w"] and r["bracket_ok"] else "NO",
    ] for r in rows])


def fixed_table(fixed: list[dict]) -> str:
    """One row per (data, generator, f): W_c and the exact dual's bracket at every lambda."""
    lambdas = sorted({r["lambda"] for r in fixed})
    groups: dict[tuple, dict[float, dict]] = {}
    for r in fixed:
        groups.setdefault((r["dataset"], r["generator"], r["divergence"]), {})[r["lambda"]] = r
    body = []
    for (dataset, generator, divergence), by_lambda in groups.items():
        w = next(iter(by_lambda.values()))["w_exact"]
        nn = next(iter(by_lambda.values())).get("nearest_neighbour", math.nan)
        body.append([dataset, generator, divergence, f"{w:.4f}", common.fmt(nn, ".4f"), *[
            f"{bracket(by_lambda[lam]['link_lower'], by_lambda[lam]['link_upper'])} ({by_lambda[lam]['link_lower'] / w:.3f})"
            if lam in by_lambda else "-" for lam in lambdas]])
    return common.markdown_table(["data", "G", "f", "W_c exact", "nearest-neighbour cost",
                                  *[f"lambda = {lam:g}" for lam in lambdas]], body)


def fit_table(fits: list[dict]) -> str:
    header = ["data", "f", "lambda", "steps per arm", "exact dual [lower, upper]",
              *[f"{arm}: cert (/ upper); re-fitted constant" for arm in ARMS], "init: cert before its plain steps"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}", r["steps"], bracket(r["link_lower"], r["link_upper"]),
        *[f"{num(r[f'{arm}_certified'])} ({common.fmt(r[f'{arm}_fraction'], '.3f' if abs(r[f'{arm}_fraction']) < 1e4 else '.2g')}); "
          f"{num(r[f'{arm}_shifted'])}" for arm in ARMS],
        num(r["init_only"]),
    ] for r in fits])


def trend_lines(rows: list[dict]) -> list[str]:
    lines = []
    for dataset, divergence in sorted({(r["dataset"], r["divergence"]) for r in rows}):
        rs = sorted((r for r in rows if r["dataset"] == dataset and r["divergence"] == divergence), key=lambda r: r["lambda"])
        lams = ", ".join(format(r["lambda"], "g") for r in rs)
        lines.append(f"- {dataset} {divergence} (lambda {lams}): exact dual / W_c "
                     + " -> ".join(f"{r['link_lower'] / r['w_exact']:.3f}" for r in rs) + "; dual cert / exact dual "
                     + " -> ".join(f"{r['fraction_of_exact']:.2f}" for r in rs) + "; primal MC / W_c "
                     + " -> ".join(f"{r['primal_mc'] / r['w_exact']:.3g}" for r in rs))
    return lines


def violations(payload: dict) -> list[str]:
    out = []
    for r in succeeded(payload)[0]:
        where = f"{r['dataset']} {r['divergence']} lambda {r['lambda']:g}"
        if not r["dual_cert_le_link"]:
            out.append(f"{where}: dual_cert {r['dual_cert']!r} > exact dual upper end {r['link_upper']!r}")
        if not r["link_le_w"]:
            out.append(f"{where}: exact dual lower end {r['link_lower']!r} > W_c {r['w_exact']!r} + lambda f(1)")
        if not r["bracket_ok"]:
            out.append(f"{where}: W_c {r['w_exact']!r} outside [{r['w_lower']!r}, {r['w_upper']!r}]")
    out += [f"fixed G {r['dataset']} {r['generator']} {r['divergence']} lambda {r['lambda']:g}: lower end "
            f"{r['link_lower']!r} > W_c {r['w_exact']!r}" for r in payload["fixed"] if not r["theorem_ok"]]
    return out


def succeeded(payload: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(trained rows, fixed rows, part-5 rows) without the runs that failed."""
    return ([r for r in payload["rows"] if "error" not in r], payload["fixed"],
            [r for r in payload["fits"] if "error" not in r])


def report_text(payload: dict, failed: list[str]) -> str:
    rows, fixed, fits = succeeded(payload)
    errors = [r for r in payload["rows"] + payload["fits"] if "error" in r]
    s = payload["settings"]
    total = len(rows) + len(fixed)
    parts = [
        f"# {NAME}{' (quick)' if payload['quick'] else ''}: {payload['command']}",
        "\n## The dual side of the chain on held-out data against samples of the trained G (c = l2)",
        "exact dual: certified bracket on V = GAN_{lambda f}(X, Y; H_c), the best 1-Lipschitz critic's value "
        f"(relative width <= {s['plan']['tol']}); W_c exact: POT; W bracket: certified Sinkhorn; dual cert / raw: "
        "the trained (and refined) data critic's value, divided by max(1, Lip bound) or not; cert / exact dual: "
        "dual cert / upper end, a lower bound on the fraction of V the certified critic reaches; primal MC: recon "
        "+ lambda * critic-free D_f of the held-out codes' mixture; primal critic: with the latent critic's "
        "estimate; exact dual / W_c: lower end / W_c; constant re-fitted: the certified critic with its constant "
        "chosen on n training points and n fresh samples (not X, Y), certified too.\n",
        main_table(rows),
        "\n## lambda trend\n",
        *trend_lines(rows),
        "\n## The exact dual on a FIXED generator across lambda (the reference run's samples): "
        "[lower, upper] (lower / W_c)\n",
        fixed_table(fixed),
    ]
    if fits:
        parts += ["\n## Part 5: fresh critics of the model's class on the fixed trained G, the same number of steps "
                  "per arm: certified dual value on (X, Y) (fraction of the exact dual's upper end)\n",
                  "plain: usual critic steps; batch: regression onto each batch's exact potentials; init: half the "
                  "steps regression onto a separate fit pair's potentials, then half plain; oracle: regression onto "
                  "the potentials of (X, Y) itself (told the answer: how much the class certifies); re-fitted "
                  "constant: the same critic with its constant chosen on the fit pair.\n",
                  fit_table(fits)]
    if errors:
        parts += ["\nRuns that FAILED (left out above):",
                  *[f"- {r['dataset']} {r['divergence']} lambda {r['lambda']:g}: {r['error']}" for r in errors]]
    unrefined = [r for r in rows if not r.get("critic_refined", True)]
    if unrefined:
        parts.append("\nCritic refinement diverged (non-finite weights; the trained critic was kept): "
                     + ", ".join(f"{r['dataset']} {r['divergence']} lambda {r['lambda']:g}" for r in unrefined) + ".")
    parts += [f"\nTheorems of the dual side checked on {total} evaluations (dual_cert <= V, V <= W_c + lambda f(1), "
              "W_c inside its certified bracket): " + ("all held." if not failed else f"{len(failed)} FAILED (bugs):"),
              *failed[:20],
              f"\n({payload['wall_seconds']:.0f} s wall clock on {s['workers']} worker(s); {describe_machine(payload['machine'])})"]
    return "\n".join(parts)


def plot(payload: dict, path: str) -> None:
    """Top row: the trained runs against lambda; bottom row: the fixed G. One column per data set."""
    plt = common.pyplot()
    rows, fixed, fits = succeeded(payload)
    datasets = [d for d in ("gaussians", "digits", "mnist") if any(r["dataset"] == d for r in rows)]
    if not datasets:
        return
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.2 * len(datasets), 8.0), squeeze=False)
    for col, dataset in enumerate(datasets):
        ax = axes[0][col]
        for k, divergence in enumerate(sorted({r["divergence"] for r in rows if r["dataset"] == dataset})):
            rs = sorted((r for r in rows if r["dataset"] == dataset and r["divergence"] == divergence), key=lambda r: r["lambda"])
            lams = [r["lambda"] for r in rs]
            ax.fill_between(lams, [r["link_lower"] for r in rs], [r["link_upper"] for r in rs], color=f"C{k}", alpha=0.35)
            ax.plot(lams, [r["link_upper"] for r in rs], f"C{k}-", lw=1, label=f"{divergence}: exact dual V")
            ax.plot(lams, positive([r["dual_cert"] for r in rs]), f"C{k}^", ls=":", label=f"{divergence}: dual cert")
            ax.plot(lams, [r["primal_mc"] for r in rs], f"C{k}s", ls="--", ms=4, label=f"{divergence}: primal MC")
            ax.fill_between(lams, [r["w_lower"] for r in rs], [r["w_upper"] for r in rs], color="0.6", alpha=0.4)
            ax.plot(lams, [r["w_exact"] for r in rs], "k.", ls="-" if k == 0 else "-.", lw=0.8,
                    label=f"W_c (G trained with {divergence})")
        ax.set_title(f"{dataset}: trained G per (f, lambda); values <= 0 not drawn", fontsize=9)
        ax2 = axes[1][col]
        fs = [r for r in fixed if r["dataset"] == dataset]
        for k, (generator, divergence) in enumerate(sorted({(r["generator"], r["divergence"]) for r in fs})):
            rs = sorted((r for r in fs if r["generator"] == generator and r["divergence"] == divergence), key=lambda r: r["lambda"])
            lams = [r["lambda"] for r in rs]
            ax2.fill_between(lams, [r["link_lower"] for r in rs], [r["link_upper"] for r in rs], color=f"C{k}", alpha=0.35)
            ax2.plot(lams, [r["link_upper"] for r in rs], f"C{k}-", lw=1, label=f"V, {divergence}, G {generator}")
            ax2.axhline(rs[0]["w_exact"], color=f"C{k}", ls=":", lw=0.8)
        ft = sorted((r for r in fits if r["dataset"] == dataset), key=lambda r: r["lambda"])
        if ft:  # part 5 runs on the trained fixed G
            ax2.plot([r["lambda"] for r in ft], positive([r["plain_certified"] for r in ft]), "k^", ls=":",
                     label=f"kl, trained G: fresh critic, certified ({ft[0]['steps']} plain steps)")
            ax2.plot([r["lambda"] for r in ft], positive([r["oracle_certified"] for r in ft]), "kv", ls="--",
                     label="kl, trained G: critic regressed on V's potentials (oracle), certified")
        ax2.set_title(f"{dataset}: fixed samples; dotted lines: W_c(X, Y); values <= 0 not drawn", fontsize=9)
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("lambda")
            a.legend(fontsize=5.5, loc="lower right")
            a.tick_params(labelsize=7)
    common.save_figure(fig, path, dpi=80)


def write_outputs(payload: dict, out: str, replot: bool = False) -> None:
    """Print the tables, write the files, and raise if a theorem of the dual side failed."""
    failed = violations(payload)
    text = report_text(payload, failed)
    print(text, flush=True)
    stem = common.result_stem(NAME, payload["quick"], out)
    common.write_text(stem + ".md", text)
    common.write_csv(stem + ".csv", payload["rows"])
    common.write_csv(stem + "_fixed.csv", payload["fixed"])
    if payload["fits"]:
        common.write_csv(stem + "_fit.csv", payload["fits"])
    if not replot:
        common.write_json(stem + ".json", payload)
    plot(payload, stem + ".png")
    print(f"wrote {stem}.md, .csv, _fixed.csv, _fit.csv, .json and .png ({os.path.basename(stem)})")
    if failed:
        raise AssertionError(f"{len(failed)} theorems of the dual side failed on these samples; see above")
    if any(not math.isfinite(r["link_upper"]) for r in payload["rows"]):
        print("note: an exact dual bracket is not finite (solver budget).")
