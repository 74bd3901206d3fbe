"""The Markdown tables of the chain study, from the rows of `studies.chain.summary`."""

from __future__ import annotations

import math

from benchmarks import common
from studies.chain.settings import NUM_LARGE
from studies.chain.summary import INEQUALITIES, pm


def chain_table(rows: list[dict]) -> str:
    header = ["data", "f", "lambda", "dual cert", "dual raw", "primal MC (n codes)", "primal MC (16k codes)",
              "primal critic", "W_c exact", "bracket [lower, upper]", "dual cert / W_c", "primal MC / W_c",
              f"W_c ({NUM_LARGE} pts)", "W_c(X, X') floor", f"dual cert / W_c ({NUM_LARGE})",
              f"primal MC 16k / W_c ({NUM_LARGE})"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}", pm(r["dual_cert"], r["dual_cert_sd"]),
        pm(r["dual_raw"], r["dual_raw_sd"]), pm(r["primal_mc"], r["primal_mc_sd"]),
        pm(r["primal_mc_more"], r["primal_mc_more_sd"]), pm(r["primal_critic"], r["primal_critic_sd"]),
        pm(r["w_exact"], r["w_exact_sd"]), f"[{r['w_lower']:.3f}, {r['w_upper']:.3f}]",
        pm(r["dual_cert_over_w"], r["dual_cert_over_w_sd"], ".2f"), pm(r["primal_mc_over_w"], r["primal_mc_over_w_sd"], ".2f"),
        pm(r["w_large"], r["w_large_sd"]), pm(r["w_floor"], r["w_floor_sd"]),
        pm(r["dual_cert_over_w_large"], r["dual_cert_over_w_large_sd"], ".2f"),
        pm(r["primal_mc_more_over_w_large"], r["primal_mc_more_over_w_large_sd"], ".2f"),
    ] for r in rows])


def diagnostics_table(rows: list[dict]) -> str:
    header = ["data", "f", "lambda", "dual raw before refinement", "primal MC (n) before", "primal MC (16k) before",
              "recon before", "sigma before", "refined E kept (step)", "Lip bound", "median |grad h|", "recon",
              "D_f MC (n)", "D_f MC (16k)", "D_f critic", "encoder sigma (median)", "SE primal MC", "SE dual raw"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}", pm(r["dual_raw_running"], r["dual_raw_running_sd"]),
        pm(r["primal_mc_running"], r["primal_mc_running_sd"]),
        pm(r["primal_mc_more_running"], r["primal_mc_more_running_sd"]),
        pm(r["recon_running"], r["recon_running_sd"]), pm(r["encoder_sigma_median_running"], math.nan),
        pm(r["encoder_best_step"], math.nan, ".0f"),
        pm(r["lipschitz_bound"], math.nan), pm(r["critic_slope_median"], math.nan), pm(r["recon"], r["recon_sd"]),
        pm(r["divergence_mc"], r["divergence_mc_sd"]), pm(r["divergence_mc_more"], r["divergence_mc_more_sd"]),
        pm(r["divergence_critic"], r["divergence_critic_sd"]), pm(r["encoder_sigma_median"], math.nan),
        pm(r["primal_mc_se"], math.nan), pm(r["dual_raw_se"], math.nan),
    ] for r in rows])


def checks_table(rows: list[dict]) -> str:
    names = [name for name, _, _ in INEQUALITIES]
    header = ["data", "f", "lambda", *names, "(primal MC - dual raw) / SE"]
    return common.markdown_table(header, [[
        r["dataset"], r["divergence"], f"{r['lambda']:g}",
        *[f"{r[f'held[{n}]']} ({r[f'margin[{n}]']:+.3g})" if r[f"held[{n}]"] != "-" else "-" for n in names],
        f"{r['z[primal_MC-dual_raw]']:+.1f}",
    ] for r in rows])


def lambda_trend(rows: list[dict]) -> str:
    """Per (dataset, f): dual cert / W_c and primal / W_c from the smallest to the largest lambda."""
    lines = []
    for dataset, divergence in sorted({(r["dataset"], r["divergence"]) for r in rows}):
        rs = sorted((r for r in rows if r["dataset"] == dataset and r["divergence"] == divergence),
                    key=lambda r: r["lambda"])
        dual = " -> ".join(f"{r['dual_cert_over_w']:.2f}" for r in rs)
        primal = " -> ".join(f"{r['primal_mc_over_w']:.3g}" for r in rs)
        critic = " -> ".join(f"{r['primal_critic_over_w']:.2f}" for r in rs)
        before = " -> ".join(f"{r['primal_mc_running_over_w']:.3g}" for r in rs)
        lams = ", ".join(f"{r['lambda']:g}" for r in rs)
        line = (f"{dataset} {divergence} (lambda {lams}): dual cert / W_c {dual}; primal MC / W_c {primal} "
                f"(before the encoder refinement {before}); primal critic / W_c {critic}")
        if all(math.isfinite(r["w_large"]) for r in rs):
            dual_large = " -> ".join(f"{r['dual_cert_over_w_large']:.2f}" for r in rs)
            primal_large = " -> ".join(f"{r['primal_mc_more_over_w_large']:.3g}" for r in rs)
            line += f"; against W_c ({NUM_LARGE} pts): dual cert {dual_large}, primal MC 16k {primal_large}"
        lines.append(line)
    return "\n".join(lines)


def generators_table(rows: list[dict]) -> str:
    header = ["data", "model", "W_c exact (held-out vs samples)", "certified upper", "certified lower", "seeds"]
    return common.markdown_table(header, [
        [r["dataset"], r["model"], pm(r["w_exact"], r["w_exact_sd"]), pm(r["w_upper"], r["w_upper_sd"]),
         pm(r["w_lower"], r["w_lower_sd"]), r["seeds"]] for r in rows])
